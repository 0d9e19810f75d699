"""The pack inside a real ComfyUI server when things go wrong: Cancel (POST /interrupt) in the middle of a long
Sampler (xDiT), and a latent the model cannot take. Each must end the prompt with a clear status in the history
and leave the server and the worker pool usable: the next prompt succeeds and still matches KSampler."""

from __future__ import annotations

import itertools
import time

import pytest

from tests.comfyui.helpers import (SD3, Events, PromptFailed, Workflow, common_nodes, descendants, execution_error,
                                   rel_l2, sampler_pair, xdit_loader)

GPUS, STRATEGY = 2, "ulysses"  # what test_comfyui_parity leaves the pool with: no restart in between
_seeds = itertools.count(1000)  # a new seed each time: ComfyUI would return a repeated prompt from its cache


def _check_usable(comfy) -> float:
    """A normal SD3 prompt on the same pool: it succeeds and Sampler (xDiT) still matches KSampler."""
    wf = Workflow()
    c = common_nodes(wf, sd3=True)
    latent = wf.add("EmptySD3LatentImage", width=128, height=128, batch_size=1)
    model = xdit_loader(wf, SD3, gpus=GPUS, strategy=STRATEGY)
    ours, theirs = sampler_pair(wf, model, c.sd3_unet, c.positive, c.negative, latent, "after", seed=next(_seeds))
    entry = comfy.run(wf, timeout=300)
    err = rel_l2(comfy.latent(entry, ours), comfy.latent(entry, theirs))
    assert err <= 1e-4, f"after the failure, Sampler (xDiT) vs KSampler relative L2 {err:.3e}"
    return err


def _pool_processes(comfy) -> set[int]:
    """The processes the server has started (the pool's launcher and ranks): the same set before and after a
    failure means the pool was not restarted."""
    return set(descendants(comfy.proc.pid))


def test_cancel_mid_run_then_a_normal_prompt_succeeds(comfy):
    wf = Workflow()
    c = common_nodes(wf, sd3=True)
    latent = wf.add("EmptySD3LatentImage", width=128, height=128, batch_size=1)
    model = xdit_loader(wf, SD3, gpus=GPUS, strategy=STRATEGY)
    steps = 10000  # minutes of sampling: only Cancel ends it in time
    sampler = wf.add("XDiTSampler", model=wf.out(model), positive=wf.out(c.positive), negative=wf.out(c.negative),
                     latent_image=wf.out(latent), seed=next(_seeds), steps=steps, cfg=1.0, sampler_name="euler",
                     scheduler="simple", denoise=1.0)
    wf.save_latent(sampler, "cancelled")
    with Events(comfy) as events:
        prompt_id = comfy.submit(wf)
        try:
            # the Sampler (xDiT)'s progress bar: the workers are stepping (not loading)
            step = events.wait_for(lambda m: m["type"] == "progress" and m["data"].get("node") == sampler
                                   and m["data"].get("value", 0) >= 3, timeout=240)["data"]
            pool = _pool_processes(comfy)
            t0 = time.monotonic()
            comfy.interrupt()
            entry = comfy.wait(prompt_id, timeout=60)
            took = time.monotonic() - t0
        finally:  # never leave minutes of sampling in the queue for the next test
            if comfy.get(f"/history/{prompt_id}").get(prompt_id) is None:
                comfy.request("/queue", {"delete": [prompt_id]})
                comfy.interrupt()
                comfy.wait(prompt_id, timeout=60)
        last = max((m["data"]["value"] for m in events.messages
                    if m["type"] == "progress" and m["data"].get("node") == sampler), default=0)
    status = entry["status"]
    kinds = [kind for kind, _ in status.get("messages", [])]
    assert status.get("status_str") == "error" and "execution_interrupted" in kinds, status
    interrupted = dict(status["messages"][kinds.index("execution_interrupted")][1])
    assert interrupted.get("node_type") == "XDiTSampler", interrupted
    assert took < 20, f"Cancel took {took:.1f} s to stop the Sampler (xDiT)"
    assert last < steps, last
    print(f"\ncancelled at step {last} of {steps} (Cancel sent at step {step['value']}), prompt ended "
          f"{took:.2f} s after POST /interrupt")
    _check_usable(comfy)
    assert _pool_processes(comfy) == pool, "Cancel restarted the worker pool"


def test_bad_latent_size_gives_a_clear_error_then_a_normal_prompt_succeeds(comfy):
    _check_usable(comfy)  # the pool is up, so the check below sees its processes
    pool = _pool_processes(comfy)
    wf = Workflow()
    c = common_nodes(wf, sd3=True)
    latent = wf.add("EmptySD3LatentImage", width=120, height=128, batch_size=1)  # 15 latent columns: SD3 patches 2
    model = xdit_loader(wf, SD3, gpus=GPUS, strategy=STRATEGY)
    sampler = wf.add("XDiTSampler", model=wf.out(model), positive=wf.out(c.positive), negative=wf.out(c.negative),
                     latent_image=wf.out(latent), seed=next(_seeds), steps=2, cfg=1.0, sampler_name="euler",
                     scheduler="simple", denoise=1.0)
    wf.save_latent(sampler, "bad_size")
    with pytest.raises(PromptFailed) as failed:
        comfy.run(wf, timeout=300)
    entry = failed.value.entry
    assert entry is not None, f"ComfyUI refused the prompt before running it: {failed.value}"
    message = execution_error(entry)
    print("\nerror in the history:", message)
    assert message.startswith(f"XDiTSampler (node {sampler})"), message
    assert "120x128 px" in message and "latent 15x16" in message, message
    assert "Traceback" not in message, message
    _check_usable(comfy)
    assert _pool_processes(comfy) == pool, "a bad request restarted the worker pool"
