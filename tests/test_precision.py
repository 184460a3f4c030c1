"""Precision: the ``precision="auto"`` decision (capabilities and measurement mocked) and bf16 against
fp32 on small shapes for the fused ReLU kernel and the Top-k path (forward, gradients, training).

Tolerances come from the spread seen over seeds 0-2 (bf16 keeps 8 significant bits: the kernels'
losses agree to about 2e-3 relative, gradients to about 1e-2 for ReLU and 5e-2 for Top-k, where a
rounded pre-activation can swap which latents are kept; the FVU after 40 training steps to 5e-3);
the bounds below are 3-4x those.
"""

import logging

import pytest
import torch

from wsae_core import data, geometry, models, train

LOSS_RTOL = 1e-2
GRAD_RTOL = {"relu": 0.04, "topk": 0.15}
TRAIN_RTOL = 0.02


# ----------------------------------------------------------------------------- decision logic


@pytest.fixture
def cpu(mock_cpu):
    """Mock the CPU: ``cpu(caps, speedup)`` sets the capability flags (named ``TestCPU``) and the bf16
    measurement (conftest's ``mock_cpu``)."""
    return lambda caps, speedup=None: mock_cpu({"cpu_name": "TestCPU", **caps}, speedup)


def test_forced_precisions(cpu):
    cpu({})
    assert models.choose_precision("fp32").dtype == torch.float32
    assert models.choose_precision("bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision must be 'auto', 'fp32' or 'bf16', got 'fp16'"):
        models.choose_precision("fp16")


@pytest.mark.parametrize(
    "caps, speedup, want, reason",
    [
        ({"amx_bf16": True, "avx512_bf16": True}, None, torch.bfloat16, "AMX-BF16"),
        ({"avx512_bf16": True}, 2.5, torch.bfloat16, "measured 2.50x"),
        ({"avx512_bf16": True}, 1.1, torch.float32, "measured only 1.10x"),
        ({"avx2": True}, None, torch.float32, "emulated"),
    ],
)
def test_auto_on_cpu(cpu, caps, speedup, want, reason):
    cpu(caps, speedup)
    got = models.choose_precision("auto", "cpu")
    assert got.dtype == want and reason in got.reason and "TestCPU" in got.reason


def test_auto_on_cuda(monkeypatch, cpu):
    cpu({})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "TestGPU")
    for supported, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
        assert models.choose_precision("auto", "cuda").dtype == want


def test_this_machine_measurement_is_a_ratio():
    s = models.bf16_matmul_speedup(n=64, reps=1)
    assert s > 0 and s == models.bf16_matmul_speedup(n=64, reps=1)  # cached


def test_trainer_uses_and_logs_the_choice(cpu, caplog):
    W = geometry.superposition_matrix([1, 2])
    sae = models.build_sae(models.SAEConfig(n_p=2, n_m=4, kind="topk", k=1))
    cfg = train.TrainConfig(steps=1, batch_size=8, warmup_steps=0, progress=False)
    for caps, want in (({"amx_bf16": True}, torch.bfloat16), ({}, None)):
        cpu(caps)
        with caplog.at_level(logging.INFO, logger="wsae_core.train"):
            t = train.Trainer(sae, data.SparseSource(W, 0.5), cfg)
        assert t.autocast_dtype == want
        assert t.precision.reason in caplog.text


# ----------------------------------------------------------------------------- bf16 vs fp32


def _sae(kind, seed):
    kw = {"k": 8} if kind == "topk" else {"l1_coeff": 1e-3}
    m = models.build_sae(models.SAEConfig(n_p=32, n_m=256, kind=kind, seed=seed, **kw))
    with torch.no_grad():
        m.b_dec.normal_(std=0.1, generator=torch.Generator().manual_seed(seed))
    return m


def _step(m, x, bf16, dead):
    m.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = m(x, None, dead) if m.cfg.kind == "topk" else m(x)
    loss = out.loss if out.auxk_loss is None else out.loss + out.auxk_loss
    loss.backward()
    detached = out._replace(loss=out.loss.detach(), auxk_loss=None if out.auxk_loss is None else out.auxk_loss.detach())
    return detached, {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("kind", ["relu", "topk"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_kernels_match_fp32(kind, seed):
    m = _sae(kind, seed)
    x = torch.randn(128, 32, generator=torch.Generator().manual_seed(seed))
    dead = torch.arange(256) % 4 == 0 if kind == "topk" else None
    o32, g32 = _step(m, x, False, dead)
    o16, g16 = _step(m, x, True, dead)
    assert o16.reconstruction.dtype == torch.float32  # fp32 losses and outputs for fp32 weights
    assert float(abs(o16.loss - o32.loss) / o32.loss) < LOSS_RTOL
    if kind == "topk":
        assert float(abs(o16.auxk_loss - o32.auxk_loss) / o32.auxk_loss) < LOSS_RTOL
    for name, g in g32.items():
        assert g16[name].dtype == torch.float32
        assert float((g16[name] - g).norm() / g.norm()) < GRAD_RTOL[kind], name


@pytest.mark.parametrize("kind", ["relu", "topk"])
def test_bf16_training_tracks_fp32(kind):
    W = geometry.superposition_matrix([2, 3, 3, 3])  # n_p = 7, n = 11
    src = data.SparseSource(W, 0.7)
    fvu = {}
    for precision in ("fp32", "bf16"):
        kw = {"k": 3} if kind == "topk" else {"l1_coeff": 1e-3}
        sae = models.build_sae(models.SAEConfig(n_p=7, n_m=32, kind=kind, seed=0, **kw))
        cfg = train.TrainConfig(steps=40, batch_size=256, lr=1e-2, warmup_steps=4, log_every=40, progress=False,
                                threads=1, precision=precision)
        t = train.Trainer(sae, src, cfg)
        assert t.precision.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        fvu[precision] = t.fit()[-1]["fvu"]
    assert abs(fvu["bf16"] - fvu["fp32"]) / fvu["fp32"] < TRAIN_RTOL, fvu
