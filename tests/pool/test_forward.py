"""The stepwise path's model calls through a real CPU pool (Engine.forward, the workers' "forward" request):
the raw model output equals one process, conditioning travels once and is sent again when the workers no longer
hold it, and bad calls are refused with the reason while the pool stays usable."""

from __future__ import annotations

import pytest
import torch

from comfy_xdit.client import Engine, ModelHandle, RequestFailed
from comfy_xdit.models.flux import FluxModel
from comfy_xdit.stepwise import CACHE_ENTRIES
from tests.flux_tiny import rel_err, tiny_checkpoint

H, W = 4, 6  # 6 image tokens: split over Ulysses 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path, model = tiny_checkpoint(tmp_path_factory.mktemp("forward"), seed=21)
    engine = Engine()
    yield engine, path, dict(model.config)
    engine.shutdown()


def _chunk(config, seed, rows=1):
    g = torch.Generator().manual_seed(seed)
    return dict(context=torch.randn(rows, 5, config["joint_attention_dim"], generator=g),
                y=torch.randn(rows, config["pooled_projection_dim"], generator=g),
                guidance=torch.full((rows,), 3.5))


def _reference(path, x, timestep, chunks):
    """The same call in this process: ComfyUI's keywords as the family names them, the timestep as the sigma
    (Flux's ComfyUI timestep is its sigma)."""
    model = FluxModel.load(path, dtype=torch.float32)
    names = model.family.comfy_inputs
    cond = {names[k]: torch.cat([c[k] for _, _, c in chunks]) for k in chunks[0][2]}
    with torch.inference_mode():
        return model.forward(x, timestep, cond)


class _Recorder:
    """Wraps the pool's request to record which tensors each forward request carried."""

    def __init__(self, pool):
        self.pool, self.sent = pool, []
        self._request = pool.request

    def __call__(self, kind, args=None, tensors=None, **kw):
        if kind == "forward":
            self.sent.append(sorted(tensors or {}))
        return self._request(kind, args, tensors, **kw)


def test_cond_and_uncond_rows_over_cfg_ranks_equal_one_process(setup, monkeypatch):
    engine, path, config = setup
    handle = ModelHandle(path=path, dtype="fp32", gpus=2, parallel=(("cfg_degree", 2),))
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 16, H, W, generator=g), torch.tensor([0.7, 0.7])
    chunks = [("cond-a", 1, _chunk(config, 1)), ("uncond-a", 1, _chunk(config, 2))]
    pool = engine.pool(2)
    recorder = _Recorder(pool)
    monkeypatch.setattr(pool, "request", recorder)
    first = engine.forward(handle, x, t, chunks, new_run=True)
    assert rel_err(first, _reference(path, x, t, chunks)) <= 1e-5
    x2 = torch.randn(2, 16, H, W, generator=g)
    second = engine.forward(handle, x2, torch.tensor([0.4, 0.4]), chunks)
    assert recorder.sent[0] == sorted(["x", "timestep"] + [f"chunk{i}.{k}" for i in range(2)
                                                           for k in ("context", "y", "guidance")])
    assert recorder.sent[1] == ["timestep", "x"], "the cached conditioning does not travel again"
    assert rel_err(second, _reference(path, x2, torch.tensor([0.4, 0.4]), chunks)) <= 1e-5


def test_evicted_conditioning_is_sent_again(setup):
    engine, path, config = setup
    handle = ModelHandle(path=path, dtype="fp32", gpus=2, parallel=(("cfg_degree", 2),))  # one pool for the module
    x, t = torch.randn(1, 16, H, W), torch.tensor([0.5])
    first = [("evict-0", 1, _chunk(config, 100))]
    engine.forward(handle, x, t, first, new_run=True)
    for i in range(1, CACHE_ENTRIES + 1):  # pushes evict-0 out of the workers' cache
        engine.forward(handle, x, t, [(f"evict-{i}", 1, _chunk(config, 100 + i))])
    again = engine.forward(handle, x, t, first)  # the client still thinks it is there: the workers say not
    assert rel_err(again, _reference(path, x, t, first)) <= 1e-5


def test_shapes_that_do_not_split_or_patch_run_as_comfyui_runs_them(setup):
    """An area crop can give any latent size: a token count that does not split over Ulysses 2 runs whole on
    each rank, and a size that is not a multiple of the patch is padded circularly and cropped back, as
    ComfyUI's DiTs do (comfy.ldm.common_dit.pad_to_patch_size)."""
    engine, path, config = setup
    handle = ModelHandle(path=path, dtype="fp32", gpus=2, parallel=(("ulysses_degree", 2),))
    t = torch.tensor([0.6])
    for h, w in ((6, 10), (5, 7)):  # 3 x 5 tokens; 5 x 7 latent pixels -> 3 x 4 patches
        x, chunks = torch.randn(1, 16, h, w), [(f"odd-{h}x{w}", 1, _chunk(config, h * w))]
        out = engine.forward(handle, x, t, chunks)
        padded = torch.nn.functional.pad(x, (0, w % 2, 0, h % 2), mode="circular")
        expected = _reference(path, padded, t, chunks)[..., :h, :w]
        assert out.shape == x.shape and rel_err(out, expected) <= 1e-5, (h, w)


def test_bad_calls_are_refused_and_the_pool_stays_usable(setup):
    engine, path, config = setup
    handle = ModelHandle(path=path, dtype="fp32", gpus=2, parallel=(("dp_degree", 2),))
    x, t = torch.randn(1, 16, H, W), torch.tensor([0.5])
    bad = dict(_chunk(config, 7), ref_latents=torch.zeros(1, 16, H, W))
    with pytest.raises(RequestFailed, match="cannot use ref_latents"):
        engine.forward(handle, x, t, [("bad-input", 1, bad)])
    with pytest.raises(RequestFailed, match="timestep.*one value per row"):
        engine.forward(handle, x, torch.tensor([0.5, 0.5]), [("rows", 1, _chunk(config, 8))])
    pipefusion = ModelHandle(path=path, dtype="fp32", gpus=2, parallel=(("pipefusion_degree", 2),))
    with pytest.raises(RequestFailed, match="cannot run a PipeFusion layout"):
        engine.forward(pipefusion, x, t, [("pp", 1, _chunk(config, 10))])
    ok = [("after", 1, _chunk(config, 11))]
    assert rel_err(engine.forward(handle, x, t, ok), _reference(path, x, t, ok)) <= 1e-5
