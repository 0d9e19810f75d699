"""ComfyUI nodes of the comfy_xdit pack: the only module that imports ComfyUI.

The node classes land with the worker pool; until then the pack registers nothing.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
