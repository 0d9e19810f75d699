"""PipeFusion: contiguous block ranges per stage, row patches, stale K/V after synchronous warmup steps."""

from .pipeline import PipeFusionRunner, PipelineStage, StageLink
from .schedule import Patch, PipeFusionOptions, balance_stages, row_patches, shard_patches, stage_ranges, whole_step
from .stale_kv import PatchWindow, StaleKVAttention

__all__ = ["Patch", "PatchWindow", "PipeFusionOptions", "PipeFusionRunner", "PipelineStage", "StageLink",
           "StaleKVAttention", "balance_stages", "row_patches", "shard_patches",
           "stage_ranges", "whole_step"]
