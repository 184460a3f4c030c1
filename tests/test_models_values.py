"""Values of small wsae_core.models helpers against independent float64 computations (written to
kill mutation survivors: see CONTRIBUTING.md, "Mutation testing")."""

import numpy as np
import pytest
import torch

from wsae_core import models
from wsae_core.models import SAEConfig


def test_auxk_factor_against_its_definition():
    """``c = dead_scale * var_Γ(x) / var_Γ(e)`` with Γ-weighted sums of squared deviations, also when
    the residual's variance is far below 1 (late in training) and when it is exactly 0."""
    rng = np.random.default_rng(0)
    x, w2 = rng.standard_normal((16, 5)), rng.uniform(0.5, 2.0, 5)
    for scale in (3.0, 1e-3):
        e = scale * rng.standard_normal((16, 5))
        var = lambda a: float(((a - a.mean(0)) ** 2 * w2).sum())
        got = models._auxk_factor(*(torch.tensor(a) for a in (x, e, w2)), 0.25)
        assert got == pytest.approx(0.25 * var(x) / var(e), rel=1e-12)
    zero = models._auxk_factor(torch.tensor(x), torch.ones(16, 5, dtype=torch.float64), torch.tensor(w2), 1.0)
    assert zero == pytest.approx(var(x) / 1e-30, rel=1e-12)  # a constant residual: finite, not inf


@pytest.mark.parametrize("kks", [(1,), (2,), (5,), (3, 2)])
def test_latent_major_rows_dot_against_a_loop(kks):
    """``_LatentMajor.rows_dot``: every selected pair's dot product, for one selection and for two
    (the Top-k and AuxK terms, whose dense rows are stacked), back in each term's (batch, kk) order."""
    g = torch.Generator().manual_seed(sum(kks))
    B, n_m, d = 3, 7, 4
    W = torch.randn(n_m, d, generator=g)
    idx_l = [torch.stack([torch.randperm(n_m, generator=g)[:kk] for _ in range(B)]) for kk in kks]
    G = torch.randn(len(kks) * B, d, generator=g)
    out = models._LatentMajor(idx_l, n_m).rows_dot(W, G)
    assert [o.shape for o in out] == [(B, kk) for kk in kks]
    for t, (o, idx) in enumerate(zip(out, idx_l)):
        for b in range(B):
            for j in range(idx.shape[1]):
                want = float(W[idx[b, j]].double() @ G[t * B + b].double())
                assert float(o[b, j]) == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("kind,kw", [("relu", {}), ("topk", {"k": 2})])
def test_practical_decode_and_encode_values(kind, kw):
    m = models.PracticalSAE(SAEConfig(n_p=4, n_m=6, kind=kind, seed=3, **kw))
    with torch.no_grad():
        m.b_dec.copy_(torch.tensor([0.5, -1.0, 0.25, 2.0]))
        m.b_enc.copy_(torch.linspace(-0.2, 0.3, 6))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(4))
    W_enc, b_enc = m.W_enc.detach().double().numpy(), m.b_enc.detach().double().numpy()
    W_dec, b_dec = m.W_dec.detach().double().numpy(), m.b_dec.detach().double().numpy()
    pre = (x.double().numpy() - b_dec) @ W_enc.T + b_enc
    lat = np.maximum(pre, 0)
    if kind == "topk":  # keep each row's 2 largest pre-activations (then the ReLU)
        lat = np.where(pre >= np.sort(pre, axis=1)[:, -2:-1], lat, 0.0)
    enc = m.encode(x)
    np.testing.assert_allclose(enc.detach().double().numpy(), lat, atol=1e-5)
    lat_t = torch.tensor(lat, dtype=torch.float32)
    np.testing.assert_allclose(m.decode(lat_t).detach().double().numpy(), lat @ W_dec + b_dec, atol=1e-5)
    out = m(x)
    np.testing.assert_allclose(out.reconstruction.detach().double().numpy(), lat @ W_dec + b_dec, atol=1e-5)


def test_stable_argsort_keeps_the_order_of_ties():
    """Python's sorted is stable: equal keys keep their positions' order (the Top-k backward relies
    on it for a fixed summation order). 5,000 keys with 7 values: many long runs of ties, beyond
    the short runs that an unstable sort would also leave in order."""
    keys = torch.randint(0, 7, (5000,), generator=torch.Generator().manual_seed(5))
    ref = sorted(range(5000), key=lambda i: int(keys[i]))
    assert models._stable_argsort(keys).tolist() == ref
    assert models._stable_argsort(keys, 7).tolist() == ref  # as 16-bit keys (numpy's radix sort)


@pytest.mark.parametrize("bound", [2**16, 2**16 + 1, 2**20])
def test_stable_argsort_with_a_bound_near_16_bits(bound):
    """Keys up to ``bound - 1`` sort the same with the bound (16-bit keys up to 2^16, else 64-bit)
    as without it: nothing wraps around at 2^16."""
    g = torch.Generator().manual_seed(bound)
    keys = torch.cat([torch.randint(0, bound, (3000,), generator=g), torch.tensor([bound - 1, 0, bound - 1, 1])])
    ref = sorted(range(len(keys)), key=lambda i: int(keys[i]))
    assert models._stable_argsort(keys, bound).tolist() == ref


@pytest.mark.parametrize("kind,kw", [("relu", {"l1_coeff": 0.3}), ("topk", {"k": 2})])
def test_fused_backward_against_autograd_for_scaled_losses_and_frozen_weights(kind, kw):
    """The hand-written backward against autograd through the unfused path (``fused=False``), for
    a loss that weights the reconstruction and sparsity terms by 2.5 and 0.7 (upstream gradients
    other than 1), and for the input's gradient alone, the weights frozen."""
    cfg = SAEConfig(n_p=5, n_m=12, kind=kind, seed=6, **kw)
    fused, plain = models.PracticalSAE(cfg), models.PracticalSAE(cfg, fused=False)
    plain.load_state_dict(fused.state_dict())
    with torch.no_grad():
        for m in (fused, plain):
            m.b_dec.copy_(torch.tensor([0.3, -0.2, 0.1, 0.4, -0.5]))
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(7))
    gamma = torch.tensor([0.5, 1.0, 1.5, 2.0, 0.8])

    def grads(m, wrt):
        xx = x.clone().requires_grad_(True)
        out = m(xx, gamma)
        loss = 2.5 * out.recon_loss + 0.7 * out.sparsity_loss
        return torch.autograd.grad(loss, [xx] + wrt)

    for a, b in zip(grads(fused, list(fused.parameters())), grads(plain, list(plain.parameters()))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for m in (fused, plain):
        m.requires_grad_(False)
    torch.testing.assert_close(grads(fused, [])[0], grads(plain, [])[0], atol=1e-5, rtol=1e-4)


def test_auxk_k_aux_default_and_smallest():
    """``k_aux`` defaults to ``n_p // 2`` (the docstring), and ``k_aux = 1`` still trains the dead
    latents: one per sample gives a positive AuxK loss."""
    m = models.PracticalSAE(SAEConfig(n_p=6, n_m=16, kind="topk", k=2, seed=8))
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(9))
    dead = torch.zeros(16, dtype=torch.bool)
    dead[4:] = True
    for fused in (True, False):
        m.fused = fused
        with torch.no_grad():
            default = float(m(x, dead_mask=dead).auxk_loss)
            assert default == pytest.approx(float(m(x, dead_mask=dead, k_aux=3).auxk_loss), rel=1e-6)
            assert default != pytest.approx(float(m(x, dead_mask=dead, k_aux=2).auxk_loss), rel=1e-3)
            assert float(m(x, dead_mask=dead, k_aux=1).auxk_loss) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_rows_is_torch_topk(dtype):
    """The fused Top-k's selection from a candidate set gives torch.topk's values (and positions,
    where no values tie), including rows whose largest entries crowd into few columns of its view,
    rows of equal values, and sizes where it falls back to torch.topk."""
    from wsae_core.models import _TOPK_SLICES, _topk_rows

    g = torch.Generator().manual_seed(0)
    # 24,576 and 65,536 latents: the k columns are themselves chosen from candidates, one level of
    # that at 24,576 (3,072 column maxima) and two at 65,536 (8,192, then 1,024)
    for B, n_m, k in [(64, 4608, 32), (16, 24576, 32), (4, 65536, 32), (8, 512, 7), (5, 100, 3), (3, 64, 8)]:
        pre = torch.randn(B, n_m, generator=g).to(dtype)
        C = n_m // _TOPK_SLICES
        if n_m % _TOPK_SLICES == 0 and B > 2:
            pre[0, ::C] = 100.0 + torch.arange(_TOPK_SLICES, dtype=dtype)  # one column holds the largest entries
            pre[1] = 1.0  # all equal
            pre[2, : 2 * k] = torch.linspace(50, 60, 2 * k).to(dtype)  # the largest in few adjacent columns
        vals, idx = _topk_rows(pre, k)
        ref_vals, ref_idx = pre.topk(k, dim=1, sorted=False)
        assert vals.dtype == dtype and idx.dtype == torch.int64 and vals.shape == idx.shape == (B, k)
        assert torch.equal(vals.sort(1).values, ref_vals.sort(1).values), (B, n_m, k)
        assert torch.equal(pre.gather(1, idx), vals)
        assert all(len(set(r.tolist())) == k for r in idx)  # k distinct latents per row
        if dtype == torch.float32:  # continuous values: no ties outside the planted rows
            rows = slice(3, None) if n_m % _TOPK_SLICES == 0 and B > 2 else slice(None)
            assert torch.equal(idx[rows].sort(1).values, ref_idx[rows].sort(1).values)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_topk_rows_relu_is_exact_on_the_positive_entries(dtype):
    """``relu=True`` (selection on the floats' bits read as integers): every row's min(k, P) largest
    positive entries are selected, as by torch.topk, and the other slots hold distinct entries <= 0;
    after the ReLU the values are torch.topk's. Rows with many, few, one and no positive entries,
    zeros of both signs, +inf and -inf, and ties; on the candidate path (24,576 and 4,608 latents)
    and on the fallback (too few latents)."""
    from wsae_core.models import _topk_rows

    g = torch.Generator().manual_seed(7)
    for B, n_m, k in [(12, 24576, 32), (12, 4608, 32), (12, 100, 3)]:
        pre = torch.randn(B, n_m, generator=g, dtype=torch.float64)
        pre[1] = -pre[1].abs() - 1e-3  # no positive entry
        pre[2] = -pre[2].abs() - 1e-3
        pre[2, n_m // 3] = 0.5  # one positive entry
        pre[3] = -pre[3].abs() - 1e-3
        pre[3, :k // 2 + 1] = torch.linspace(0.1, 2.0, k // 2 + 1, dtype=torch.float64)  # fewer than k
        pre[4, ::7] = 0.0
        pre[4, 1::7] = -0.0
        pre[4] = pre[4].clamp_max(0.0)  # zeros of both signs and negatives only
        pre[5, 5], pre[5, 17] = float("inf"), float("-inf")
        pre[6] = 1.0  # all equal
        pre[7] = -pre[7].abs()
        pre[7, -5:] = 3.0  # ties among the few positives
        pre = pre.to(dtype)
        vals, idx = _topk_rows(pre, k, relu=True)
        ref_vals = pre.topk(k, dim=1, sorted=False).values
        assert vals.dtype == dtype and idx.dtype == torch.int64 and vals.shape == idx.shape == (B, k)
        assert torch.equal(pre.gather(1, idx), vals)
        assert all(len(set(r.tolist())) == k for r in idx)  # k distinct latents per row
        # after the ReLU, the same multiset of values as torch.topk's
        assert torch.equal(vals.relu().sort(1).values, ref_vals.relu().sort(1).values), (B, n_m, dtype)
        for r in range(B):
            n_pos = int((pre[r] > 0).sum())
            assert int((vals[r] > 0).sum()) == min(k, n_pos), (r, n_m)  # the rest are <= 0
        assert int((vals[3] > 0).sum()) == k // 2 + 1 and int((vals[2] > 0).sum()) == 1
        assert float(vals[5].max()) == float("inf")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_topk_rows_relu_compares_bit_patterns_on_the_candidate_path(dtype):
    """On rows with no positive entry: ``relu=True`` on the candidate path (from ``n_m = 8 * 2k``)
    compares the bits as integers, which order negative floats by magnitude, so it returns the k
    most negative entries (all zeroed by the caller's ReLU); ``relu=False`` and the fallback sizes
    (``n_m`` not a multiple of 8, or fewer than 2k columns) return torch.topk's k largest."""
    from wsae_core.models import _topk_rows

    g = torch.Generator().manual_seed(11)

    def values(v):
        return v.float().sort(1).values

    for n_m, fast in [(512, True), (24576, True), (504, False), (515, False)]:
        pre = -(torch.rand(3, n_m, generator=g) + 0.01).to(dtype)
        largest = values(pre.topk(32, dim=1).values)
        most_negative = values(pre.topk(32, dim=1, largest=False).values)
        assert torch.equal(values(_topk_rows(pre, 32)[0]), largest), n_m
        got = values(_topk_rows(pre, 32, relu=True)[0])
        assert torch.equal(got, most_negative if fast else largest), (n_m, fast)


def test_fused_topk_on_the_candidate_path_with_few_positive_preactivations():
    """The fused Top-k SAE where its selection compares bits as integers (512 latents, k = 32),
    on rows with many, fewer than k and no positive pre-activations: the dense latents, the
    reconstruction, both losses (AuxK on) and every gradient are those of the unfused path
    (torch.topk), and the trainer's 'fired' set (values > 0) is the same."""
    cfg = SAEConfig(n_p=16, n_m=512, kind="topk", k=32, seed=3)
    fused, plain = models.PracticalSAE(cfg), models.PracticalSAE(cfg, fused=False)
    with torch.no_grad():
        fused.b_enc.copy_(torch.linspace(-0.5, -0.05, 512))
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(4))
    x[3:6] *= 0.05  # small rows: fewer than k latents above the negative biases
    x[6] = 0.0  # none
    dead = torch.arange(512) % 5 == 0
    outs, grads = [], []
    for m in (fused, plain):
        out = m(x, dead_mask=dead, k_aux=8)
        g = torch.autograd.grad(out.loss + out.auxk_loss + (out.reconstruction ** 3).sum(), list(m.parameters()))
        outs.append(out)
        grads.append(g)
    n_pos = (plain._pre(x) > 0).sum(1)
    assert int((n_pos < 32).sum()) >= 4 and int(n_pos[6]) == 0  # the case under test occurs
    a, b = outs
    torch.testing.assert_close(models.dense_latents(a, 512), models.dense_latents(b, 512).detach())
    torch.testing.assert_close(a.reconstruction, b.reconstruction, atol=1e-6, rtol=1e-5)
    for name in ("recon_loss", "auxk_loss"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-6, rtol=1e-5)
    assert [set(r[v > 0].tolist()) for r, v in zip(a.latent_indices, a.latents)] == \
        [set(r[v > 0].tolist()) for r, v in zip(b.latent_indices, b.latents.detach())]
    for ga, gb in zip(*grads):  # the cubed reconstruction amplifies summation-order rounding
        torch.testing.assert_close(ga, gb, atol=1e-4 * float(gb.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("depth", [32, 2])
@pytest.mark.parametrize("d", [20, 32, 63, 64, 768])
def test_encode_folds_the_bias_into_the_product(d, depth, monkeypatch):
    """The bf16 encoder with the bias folded into the GEMM (inner dimension padded to a multiple of
    32 on AMX CPUs, 2 elsewhere, including when d + 1 already is one) equals addmm in bf16; fp32 is
    addmm itself."""
    from wsae_core.models import _encode

    monkeypatch.setattr(models, "_fold_depth", lambda: depth)
    g = torch.Generator().manual_seed(d)
    x, W, b = torch.randn(7, d, generator=g), torch.randn(33, d, generator=g), torch.randn(33, generator=g)
    ref = torch.addmm(b.bfloat16(), x.bfloat16(), W.bfloat16().T).float()
    got = _encode(x, W, b, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == (7, 33)
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
    assert torch.equal(_encode(x, W, b, torch.float32), torch.addmm(b, x, W.T))


# ----------------------------------------------------------------------------- round 6: models survivors


def test_fold_depth_is_an_amx_tile_only_with_amx(monkeypatch):
    """The bf16 encoder pads its inner dimension to 32 (an AMX tile's depth) on AMX CPUs only."""
    try:
        for caps, want in [({"amx_bf16": True, "avx512_bf16": True}, 32), ({"avx512_bf16": True}, 2), ({}, 2)]:
            monkeypatch.setattr(models, "cpu_capabilities", lambda caps=caps: dict(caps))
            models._fold_depth.cache_clear()
            assert models._fold_depth() == want
    finally:
        models._fold_depth.cache_clear()  # the next call asks the real CPU again


@pytest.mark.parametrize("caps, speedup, want", [
    ({"cpu_name": "XeonTest", "amx_bf16": True, "avx512_bf16": True}, None,
     (torch.bfloat16, "XeonTest has AMX-BF16 matrix units")),
    ({"cpu_name": "ZenTest", "avx512_bf16": True}, 1.2,  # the threshold itself counts as faster
     (torch.bfloat16, "ZenTest has AVX-512-BF16; bf16 matmul measured 1.20x fp32")),
    ({"cpu_name": "ZenTest", "avx512_bf16": True}, 1.19,
     (torch.float32, "ZenTest has AVX-512-BF16 but bf16 matmul measured only 1.19x fp32")),
    ({"avx2": True}, None,  # no name reported: the reason still reads as a sentence
     (torch.float32, "this CPU has no bf16 matrix instructions (no AMX-BF16 or AVX-512-BF16): "
                     "bf16 would be emulated and slower than fp32")),
])
def test_choose_precision_every_cpu_branch_exactly(mock_cpu, caps, speedup, want):
    """Each branch of the CPU rule: dtype and the whole logged reason, the flag names exactly as
    torch.cpu.get_capabilities() spells them (lower case), and the 1.2x threshold inclusive."""
    mock_cpu(caps, speedup)
    got = models.choose_precision("auto", "cpu")
    assert (got.dtype, got.reason) == want
    assert got == models.choose_precision("auto", torch.device("cpu"))


def test_choose_precision_forced_cuda_and_other_devices_exactly(mock_cpu, monkeypatch):
    mock_cpu({"cpu_name": "XeonTest", "amx_bf16": True})  # must not be read for these
    assert tuple(models.choose_precision("fp32", "cpu")) == (torch.float32, "fp32 requested")
    assert tuple(models.choose_precision("bf16", "cpu")) == (torch.bfloat16, "bf16 requested")
    assert tuple(models.choose_precision("fp32", "cuda")) == (torch.float32, "fp32 requested")
    names = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: names.append(device) or "H200Test")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert tuple(models.choose_precision("auto", "cuda:1")) == (torch.bfloat16, "CUDA device H200Test supports bf16")
    assert names == [torch.device("cuda:1")]  # the name of the device asked about, not the current one
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert tuple(models.choose_precision("auto", "cuda")) == (torch.float32, "CUDA device without bf16 support")
    # a device type with no rule (the AMX flag above must not leak into it)
    assert tuple(models.choose_precision("auto", "meta")) == (torch.float32, "no bf16 rule for device type 'meta'")
    for bad in ("BF16", "FP32", "fp16"):
        with pytest.raises(ValueError, match=repr(bad)):
            models.choose_precision(bad)


def test_shape_error_hint_only_for_one_sample_of_the_right_length():
    """The ``x_p[None]`` hint appears for a 1-D input of length n_p only: not for a 2-D input of the
    wrong width (also not one whose first dimension happens to be n_p), not for a wrong 1-D length."""
    m = models.PracticalSAE(SAEConfig(n_p=4, n_m=6, kind="relu"))
    cases = {(4,): True, (3,): False, (4, 5): False, (2, 3): False}
    for shape, hint in cases.items():
        with pytest.raises(ValueError) as err:
            m.encode(torch.zeros(shape))
        msg = str(err.value)
        want = f"x_p must have shape (batch, n_p = 4), got {shape}"
        assert msg == (want + "; for one sample use x_p[None] (shape (1, 4))" if hint else want), msg


def test_bf16_input_selects_bf16_for_practical_saes_and_is_cast_for_the_theory_sae():
    """bf16 input to a practical SAE stays bf16 (it selects the bf16 kernels: the same latents as
    bf16 autocast on fp32 input, not the fp32 latents); the theory SAE has no bf16 path and computes
    on the fp32 cast, exactly as for fp32 input."""
    x = torch.randn(9, 8, generator=torch.Generator().manual_seed(1))
    xb = x.bfloat16()
    for kind, kw in (("relu", {}), ("topk", {"k": 3})):
        m = models.PracticalSAE(SAEConfig(n_p=8, n_m=40, kind=kind, seed=2, **kw))
        with torch.no_grad():
            got = m(xb)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ref = m(xb.float())
            fp32 = m(xb.float())
        assert torch.equal(got.latents, ref.latents), kind
        assert not torch.equal(got.latents.float(), fp32.latents.float()), kind
    t = models.TheorySAE(SAEConfig(n_p=8, n_m=12, kind="theory", seed=2))
    with torch.no_grad():
        got, ref = t(xb), t(xb.float())
    assert got.latents.dtype == torch.float32 and torch.equal(got.latents, ref.latents)
    assert torch.equal(got.reconstruction, ref.reconstruction)


def test_fvu_for_data_of_small_variance():
    """``_fvu`` is a ratio: scaling the data and the reconstruction by 1e-3 leaves it unchanged (no
    floor on the denominator beyond the guard against an exact zero)."""
    g = torch.Generator().manual_seed(3)
    x, xh = torch.randn(20, 6, generator=g, dtype=torch.float64), torch.randn(20, 6, generator=g, dtype=torch.float64)
    want = float(((xh - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    for s in (1.0, 1e-3):
        assert float(models._fvu(s * x, s * xh)) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0])
def test_initial_rows_have_the_stated_norms(scale):
    """The theory SAE's rows and the practical encoder's rows have norm ``init_scale``; the practical
    decoder's rows are those directions at unit norm (``W_dec = W_enc / init_scale``)."""
    t = models.TheorySAE(SAEConfig(n_p=5, n_m=7, kind="theory", init_scale=scale, seed=4))
    torch.testing.assert_close(t.W_m.detach().norm(dim=1), torch.full((7,), scale))
    p = models.PracticalSAE(SAEConfig(n_p=5, n_m=7, kind="relu", init_scale=scale, seed=4))
    torch.testing.assert_close(p.W_enc.detach().norm(dim=1), torch.full((7,), scale))
    torch.testing.assert_close(p.W_dec.detach().norm(dim=1), torch.ones(7))
    torch.testing.assert_close(p.W_dec.detach(), p.W_enc.detach() / scale)


@pytest.mark.parametrize("field, value, ok", [
    ("n_p", 1, True), ("n_m", 1, True), ("n_p", 0, False),
    ("k", 6, True), ("k", 7, False),  # k = n_m is allowed (every latent kept)
    ("l1_coeff", True, False), ("l1_coeff", "0.1", False), ("l1_coeff", 0, True),
    ("seed", 2**63 - 1, True), ("seed", 2**63, False), ("seed", "3", False), ("seed", 2 * 63, True),
])
def test_config_bounds_and_types(field, value, ok):
    kw = {"n_p": 3, "n_m": 6, "kind": "topk", "k": 2}
    if field == "n_m":
        kw.update(k=1)
    if field == "l1_coeff":
        kw.update(kind="relu", k=None)
    kw[field] = value
    if ok:
        assert getattr(SAEConfig(**kw), field) == value
    else:
        with pytest.raises(ValueError, match=field):
            SAEConfig(**kw)


def test_default_practical_sae_runs_the_fused_kernels():
    """``fused=True`` is the default (the plain autograd path is the tests' reference, several times
    slower): the loss's graph goes through the hand-written Functions."""
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(5))
    for kind, kw, fn in (("relu", {}, "_FusedReluSAE"), ("topk", {"k": 2}, "_FusedTopKSAE")):
        m = models.PracticalSAE(SAEConfig(n_p=5, n_m=8, kind=kind, **kw))
        assert m.fused is True
        assert type(m(x).recon_loss.grad_fn).__name__ == fn + "Backward"
        m.fused = False
        assert "Fused" not in type(m(x).recon_loss.grad_fn).__name__


@pytest.mark.parametrize("use", ["latents", "reconstruction", "recon_loss", "sparsity_loss", "recon_no_l1_grad"])
def test_fused_relu_backward_when_the_loss_reads_some_outputs_only(use):
    """The fused ReLU kernel leaves the gradients of unused outputs as None (no zero tensors): its
    backward must then give autograd's gradients for a loss that reads only the latents, only the
    reconstruction, only one loss term, or the reconstruction loss while L1 is on but unused."""
    cfg = SAEConfig(n_p=5, n_m=9, kind="relu", l1_coeff=0.2, seed=6)
    fused, plain = models.PracticalSAE(cfg), models.PracticalSAE(cfg, fused=False)
    with torch.no_grad():
        fused.b_dec.copy_(torch.tensor([0.3, -0.2, 0.1, 0.4, -0.5]))
        fused.b_enc.copy_(torch.linspace(-0.1, 0.2, 9))
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(7))
    r_lat = torch.randn(7, 9, generator=torch.Generator().manual_seed(8))
    r_rec = torch.randn(7, 5, generator=torch.Generator().manual_seed(9))

    def grads(m):
        xx = x.clone().requires_grad_(True)
        out = m(xx)
        loss = {"latents": lambda: (out.latents * r_lat).sum(),
                "reconstruction": lambda: (out.reconstruction * r_rec).sum(),
                "recon_loss": lambda: 1.5 * out.recon_loss,
                "sparsity_loss": lambda: 1.5 * out.sparsity_loss,
                "recon_no_l1_grad": lambda: out.recon_loss + (out.latents * r_lat).sum()}[use]()
        return torch.autograd.grad(loss, [xx, *m.parameters()], allow_unused=True)

    for a, b in zip(grads(fused), grads(plain)):
        a = torch.zeros_like(b) if a is None and b is not None else a
        b = torch.zeros_like(a) if b is None and a is not None else b
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n_m", [5, 1024, 2500])
def test_before_step_removes_the_radial_gradient_of_every_row(n_m):
    """``before_step`` (in blocks of rows: one, exactly one and three with a partial last) leaves
    ``g - (g · w) w`` for each unit decoder row ``w``, against float64, and nothing along ``w``."""
    m = models.PracticalSAE(SAEConfig(n_p=6, n_m=n_m, kind="topk", k=2, seed=1))
    g = torch.randn(n_m, 6, generator=torch.Generator().manual_seed(n_m))
    m.W_dec.grad = g.clone()
    m.before_step()
    W, G = m.W_dec.detach().double(), g.double()
    want = G - (G * W).sum(1, keepdim=True) * W
    torch.testing.assert_close(m.W_dec.grad.double(), want, atol=1e-6, rtol=0)
    assert float((m.W_dec.grad.double() * W).sum(1).abs().max()) < 1e-6


def test_pairs_are_sorted_as_16_bit_keys_when_they_fit(monkeypatch):
    """The speed path, not only the answer: keys below a bound of at most 2^16 reach numpy's stable
    sort as ``uint16`` (its radix sort, ~10x faster than 64-bit keys at a step's 131,072 pairs),
    larger bounds or none as they are; ``_LatentMajor`` passes the number of latents as the bound."""
    seen = []
    real = np.argsort

    def spy(a, *args, **kw):
        seen.append(a.dtype)
        return real(a, *args, **kw)

    monkeypatch.setattr(models.np, "argsort", spy)
    keys = torch.tensor([3, 0, 2, 3, 1])
    for bound, want in [(4, np.uint16), (2**16, np.uint16), (2**16 + 1, np.int64), (None, np.int64)]:
        seen.clear()
        assert models._stable_argsort(keys, bound).tolist() == [1, 4, 2, 0, 3]
        assert seen == [np.dtype(want)], bound
    seen.clear()
    models._LatentMajor([torch.tensor([[3, 0], [2, 1]])], 4)
    assert seen == [np.dtype(np.uint16)]
