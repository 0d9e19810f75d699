"""ComfyUI entry point of the comfy_xdit node pack.

Guarded: outside ComfyUI (tests, workers, the demo) this file imports nothing of ComfyUI
and registers no nodes.
"""

try:
    import folder_paths  # noqa: F401  (present only inside a ComfyUI process)
except ImportError:
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
