"""The worker pool as the browser sees it: the status payload, what the nodes are doing, the
websocket events, and the HTTP routes of the sidebar tab.

    labels      file names never paths, layout labels, an error's root cause
    activity    ActivityTracker: the running request, its steps, the last error
    gpu_memory  what each rank's process holds on its GPU (NVML, else nvidia-smi)
    payload     status_payload(): everything the sidebar shows
    events      EventSender: progress, error and status events over send_sync
    routes      StatusRoutes and register_routes(): GET status, POST stop, POST unload

Nothing here imports ComfyUI. nodes.py registers the routes on PromptServer's route table
(an aiohttp RouteTableDef) and hands its send_sync to make_event_sender(); everything else
works on the public accessors of client.py's Engine (current_pool, hold_if_idle, status,
unload, shutdown) and of the WorkerPool it holds (alive, death_reason, info, options).

What leaves this package never carries a file path: models, VAEs and LoRAs are named by their
file name, and every string of a payload has absolute directories stripped (error texts too).
"""

from .activity import ActivityTracker
from .events import ERROR_EVENT, PROGRESS_EVENT, STATUS_EVENT, EventSender, make_event_sender
from .gpu_memory import nvml_memory_used
from .labels import describe_model_key, file_name, redact, root_cause, strategy_label
from .payload import status_payload
from .routes import StatusRoutes, register_routes

__all__ = ["ERROR_EVENT", "PROGRESS_EVENT", "STATUS_EVENT", "ActivityTracker", "EventSender", "StatusRoutes",
           "describe_model_key", "file_name", "make_event_sender", "nvml_memory_used", "redact", "register_routes",
           "root_cause", "status_payload", "strategy_label"]
