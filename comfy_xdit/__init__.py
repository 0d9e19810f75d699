"""comfy_xdit: multi-GPU Diffusion Transformer engine behind the ComfyUI nodes.

This package never imports ComfyUI; nodes.py at the repository root is the only bridge.
"""

__version__ = "0.1.0"
