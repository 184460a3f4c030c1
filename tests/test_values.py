"""Reported numbers against independent computations.

One optimiser step of the trainer against Adam written out by hand; the bf16 path against a
float64 reference; the FVU of ``ForwardOutput`` and the splice KL against their formulas; the
weighted theory fit against what Theorem 5's weighting implies; the dead-latent counter on a
planted firing schedule; the signed matching on generic planted directions.
"""

import math

import numpy as np
import pytest
import torch

from wsae_core import geometry, metrics, models, train
from wsae_core.models import SAEConfig


class Batches:
    """A data source that hands out the given batches in order (``sample`` ignores the generator)."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0
        self.n_p = batches[0].shape[1]

    def sample(self, batch, generator):
        out = self.batches[self.i]
        assert out.shape[0] == batch
        self.i += 1
        return out.clone()


# ----------------------------------------------------------------------------- one optimiser step


def _ref_forward(kind, P, x, k=None, l1=0.0, gamma=None, dead=None, k_aux=None):
    """``(loss, auxk, fired)``: the loss (float64) of the SAE with parameters ``P`` written out from the
    models' docstrings, the AuxK term times its coefficient (0 without dead latents), and the latents
    that fired (value > 0)."""
    w2 = torch.ones(x.shape[1], dtype=x.dtype) if gamma is None else gamma**2
    if kind == "theory":
        lat = torch.relu(x @ P["W_m"].T)
        rec = lat @ P["W_m"]
        return ((x - rec) ** 2 * w2).sum() / x.shape[0], 0.0, (lat > 0).any(0)
    pre = (x - P["b_dec"]) @ P["W_enc"].T + P["b_enc"]
    if kind == "relu":
        lat = torch.relu(pre)
    else:
        v, i = pre.topk(k, dim=1)
        lat = torch.zeros_like(pre).scatter(1, i, v.relu())
    rec = lat @ P["W_dec"] + P["b_dec"]
    loss = ((x - rec) ** 2 * w2).sum() / x.shape[0] + l1 * lat.sum() / x.shape[0]
    aux = 0.0
    if dead is not None and dead.any():
        ids = dead.nonzero().squeeze(1)
        ka = min(k_aux, ids.numel())
        av, ai = pre[:, ids].topk(ka, dim=1)
        e_hat = torch.zeros_like(pre).scatter(1, ids[ai], av.relu()) @ P["W_dec"]
        e = (x - rec).detach()
        var = lambda t: (((t - t.mean(0)) ** 2).sum(0) * w2).sum()  # noqa: E731
        c = min(ids.numel() / k_aux, 1.0) * float(var(x) / var(e))
        aux = train.AUXK_COEFF * c * ((e_hat - e) ** 2 * w2).sum() / x.shape[0]
    return loss, aux, (lat > 0).any(0)


def _hand_adam(P, grads, state, t, lr, b1=0.9, b2=0.999, eps=1e-8):
    for n, g in grads.items():
        m, v = state.setdefault(n, (torch.zeros_like(g), torch.zeros_like(g)))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        state[n] = (m, v)
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        P[n] = P[n] - lr * m_hat / (v_hat.sqrt() + eps)


@pytest.mark.parametrize("kind, kw", [("theory", {}), ("relu", {"l1_coeff": 0.02}), ("topk", {"k": 2})])
def test_two_trainer_steps_equal_adam_by_hand(kind, kw):
    """Steps 0 and 1 of ``Trainer.fit``: the learning-rate schedule (warm-up ``lr (step+1) / warmup``),
    ``b_dec`` at the first batch's mean, the decoder-gradient projection, Adam with bias correction,
    the unit-norm decoder rows, and (Top-k) the AuxK term on latents dead after one step."""
    n_p, n_m, B = 5, 10, 12
    cfg_m = SAEConfig(n_p=n_p, n_m=n_m, kind=kind, seed=1, **kw)
    model = models.build_sae(cfg_m)
    g = torch.Generator().manual_seed(7)
    batches = [torch.randn(B, n_p, generator=g) * torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0]) + 0.3 for _ in range(2)]
    gamma = torch.tensor([1.0, 0.5, 2.0, 1.0, 1.5])
    cfg = train.TrainConfig(steps=10, batch_size=B, lr=0.01, warmup_steps=4, dead_steps=1, log_every=1,
                            progress=False, precision="fp32", threads=1)
    trainer = train.Trainer(model, Batches(batches), cfg, gamma=gamma)

    P = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    state = {}
    g64 = gamma.double()
    since = torch.zeros(n_m, dtype=torch.long)
    for step in range(2):
        x = batches[step].double()
        if step == 0 and kind != "theory":
            P["b_dec"] = x.mean(0)  # b_dec starts at the mean of the first batch
        Q = {n: p.clone().requires_grad_() for n, p in P.items()}
        dead = (since >= 1) if kind == "topk" else None
        loss, aux, fired = _ref_forward(kind, Q, x, k=kw.get("k"), l1=kw.get("l1_coeff", 0.0), gamma=g64, dead=dead,
                                        k_aux=n_p // 2)
        grads = dict(zip(Q, torch.autograd.grad(loss + aux, list(Q.values()))))
        if kind != "theory":  # no component along a decoder row (steps stay on the unit sphere)
            W = P["W_dec"]
            grads["W_dec"] = grads["W_dec"] - (grads["W_dec"] * W).sum(1, keepdim=True) * W
        lr = 0.01 * (step + 1) / 4
        _hand_adam(P, grads, state, step + 1, lr)
        if kind != "theory":
            P["W_dec"] = P["W_dec"] / P["W_dec"].norm(dim=1, keepdim=True)
        since = torch.where(fired, 0, since + 1)

        trainer.fit(until=step + 1)
        h = trainer.history[-1]
        assert h["lr"] == pytest.approx(lr, rel=1e-12)
        assert h["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
        if kind == "topk":
            assert h["auxk_loss"] * train.AUXK_COEFF == pytest.approx(float(torch.as_tensor(aux).detach()), rel=1e-4, abs=1e-12)
        for n, p in model.named_parameters():
            # Adam moves each entry by about lr; float32 gradients and weights agree to ~1e-6 of that
            torch.testing.assert_close(p.detach().double(), P[n], atol=2e-6, rtol=1e-5, msg=f"{kind} step {step}: {n}")
        assert torch.equal(trainer.steps_since_fired, since)
    if kind == "topk":
        assert since.any(), "the planted case must have latents dead after step 0, so that AuxK acts at step 1"
        assert trainer.history[-1]["auxk_loss"] > 0


def test_lr_schedule_values():
    """``lr_at`` against its formula at the points that matter."""
    cfg = train.TrainConfig(steps=11, lr=0.1, warmup_steps=2, decay="cosine", final_lr_ratio=0.2)
    assert train.lr_at(0, cfg) == pytest.approx(0.05)
    assert train.lr_at(1, cfg) == pytest.approx(0.1)
    assert train.lr_at(2, cfg) == pytest.approx(0.1)  # decay starts after the warm-up, from the peak
    span = 11 - 1 - 2
    for s in (3, 6, 10):
        t = (s - 2) / span
        assert train.lr_at(s, cfg) == pytest.approx(0.1 * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * t))))
    assert train.lr_at(10, cfg) == pytest.approx(0.02)
    lin = train.TrainConfig(steps=11, lr=0.1, warmup_steps=2, decay="linear", final_lr_ratio=0.2)
    assert train.lr_at(6, lin) == pytest.approx(0.1 * (0.2 + 0.8 * (1 - 4 / 8)))
    const = train.TrainConfig(steps=11, lr=0.1, warmup_steps=0, decay="constant")
    assert train.lr_at(0, const) == train.lr_at(10, const) == 0.1
    assert train.width_scaled_lr(2**14) == pytest.approx(2e-4)
    assert train.width_scaled_lr(4 * 2**14) == pytest.approx(1e-4)


# ----------------------------------------------------------------------------- bf16 against fp32


# bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per operand); a dot product of n_p = 8
# terms of order 1 and a loss summed over them stay within 1e-2 of the float64 value on these shapes.
BF16_LOSS_RTOL = 2e-2
BF16_GRAD_RTOL = 5e-2


@pytest.mark.parametrize("kind, kw", [("relu", {"l1_coeff": 0.01}), ("topk", {"k": 3})])
def test_bf16_autocast_against_float64(kind, kw):
    n_p, n_m, B = 8, 24, 32
    m = models.PracticalSAE(SAEConfig(n_p=n_p, n_m=n_m, kind=kind, seed=2, **kw))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # non-zero biases, or a kernel that drops one would pass
        m.b_enc.copy_(0.3 * torch.randn(n_m, generator=g))
        m.b_dec.copy_(torch.randn(n_p, generator=g))
    x = torch.randn(B, n_p, generator=torch.Generator().manual_seed(3)) + m.b_dec.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    grads = dict(zip([n for n, _ in m.named_parameters()], torch.autograd.grad(out.loss, list(m.parameters()))))
    P = {n: p.detach().double().clone().requires_grad_() for n, p in m.named_parameters()}
    ref, _, _ = _ref_forward(kind, P, x.double(), k=kw.get("k"), l1=kw.get("l1_coeff", 0.0))
    ref_grads = dict(zip(P, torch.autograd.grad(ref, list(P.values()))))
    assert abs(float(out.loss.detach()) - float(ref.detach())) <= BF16_LOSS_RTOL * float(ref.detach())
    for n, gref in ref_grads.items():
        assert grads[n].dtype == torch.float32
        err = float((grads[n].double() - gref).norm().detach() / gref.norm().detach())
        assert err <= BF16_GRAD_RTOL, (n, err)
    # and it is a bf16 computation, not fp32 relabelled: the loss differs from the fp32 one
    assert float(out.loss.detach()) != float(m(x).loss.detach())


# ----------------------------------------------------------------------------- FVU


@pytest.mark.parametrize("kind, kw", [("theory", {}), ("relu", {"l1_coeff": 0.01}), ("topk", {"k": 3})])
def test_forward_fvu_is_the_formula(kind, kw):
    """``fvu = sum||x - x̂||² / sum||x - mean_batch(x)||²``, unweighted even when Γ weights the loss."""
    m = models.build_sae(SAEConfig(n_p=6, n_m=12, kind=kind, seed=0, **kw))
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0)) * 2 + 1.5  # non-zero mean
    gamma = torch.tensor([0.2, 1.0, 3.0, 1.0, 0.5, 2.0])
    out = m(x, gamma)
    X, R = x.double(), out.reconstruction.detach().double()
    want = float(((X - R) ** 2).sum() / ((X - X.mean(0)) ** 2).sum())
    assert float(out.fvu) == pytest.approx(want, rel=1e-5)
    assert metrics.fvu(X.numpy(), R.numpy()) == pytest.approx(want, rel=1e-12)
    # the weighted loss is a different number here, so a fvu computed from it would fail above
    assert float(out.recon_loss.detach()) == pytest.approx(float(((X - R) ** 2 * gamma.double() ** 2).sum() / 40), rel=1e-5)


@pytest.mark.parametrize("precision, rel", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_trainer_history_reports_the_step_fvu(precision, rel):
    """The logged FVU is the formula's, in fp32 to 1e-5 and under bf16 autocast to bf16's precision
    (on every CPU: ``precision="auto"`` would pick one or the other by machine)."""
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0)) + 2.0
    model = models.build_sae(SAEConfig(n_p=4, n_m=6, kind="theory", seed=0))
    W0 = model.W_m.detach().clone()
    t = train.Trainer(model, Batches([x]), train.TrainConfig(steps=1, batch_size=16, lr=1e-3, warmup_steps=0,
                                                             log_every=1, progress=False, threads=1,
                                                             precision=precision))
    h = t.fit()[-1]
    rec = torch.relu(x.double() @ W0.double().T) @ W0.double()  # the forward was before the step
    want = float(((x.double() - rec) ** 2).sum() / ((x.double() - x.double().mean(0)) ** 2).sum())
    assert h["fvu"] == pytest.approx(want, rel=rel)
    if precision == "fp32":
        assert h["l0"] == pytest.approx(float((x @ W0.T > 0).sum(1).float().mean()))


# ----------------------------------------------------------------------------- weighted theory fit


def _per_dim_error(W_p, x, W_m):
    Xp = x @ W_p.T
    R = Xp - np.maximum(Xp @ W_m.T, 0) @ W_m
    return (R**2).mean(0)


def test_fit_theory_sae_weighting_moves_error_as_theory_says():
    """Up-weighting a dimension lowers its reconstruction error and raises the others' (the fit trades
    them: Theorem 5's reweighting); a uniform Γ = c·1 fits the same encoder as no Γ, with c² times the loss."""
    W_p = geometry.superposition_matrix([3])  # triangle: n_p = 2, n = 3; with n_m = 2 no exact fit exists
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (400, 3)) * (rng.uniform(size=(400, 3)) > 0.5)
    plain = geometry.fit_theory_sae(W_p, x, 2, init="random", seed=1)
    ones = geometry.fit_theory_sae(W_p, x, 2, gamma=np.ones(2), init="random", seed=1)
    np.testing.assert_allclose(ones.W_m, plain.W_m, atol=1e-12)
    assert ones.loss == plain.loss
    scaled = geometry.fit_theory_sae(W_p, x, 2, gamma=np.full(2, 3.0), init="random", seed=1)
    np.testing.assert_allclose(scaled.W_m, plain.W_m, atol=1e-4)
    assert scaled.loss == pytest.approx(9 * plain.loss, rel=1e-6)
    base = _per_dim_error(W_p, x, plain.W_m)
    assert base.min() > 1e-3  # the unweighted fit leaves error in both dimensions
    for dim in (0, 1):
        gamma = np.ones(2)
        gamma[dim] = 4.0
        fit = geometry.fit_theory_sae(W_p, x, 2, gamma=gamma, init="random", seed=1)
        err = _per_dim_error(W_p, x, fit.W_m)
        assert err[dim] < 0.95 * base[dim], (dim, err, base)
        assert err[1 - dim] > base[1 - dim], (dim, err, base)
        # the reported loss is the weighted one
        assert fit.loss == pytest.approx(float((err * gamma**2).sum()), rel=1e-9)


# ----------------------------------------------------------------------------- dead-latent counter


# latent j fires at step t iff SCHEDULE[t][j]
SCHEDULE = [
    [1, 1, 0, 0],
    [1, 0, 0, 0],
    [1, 0, 0, 1],
    [1, 0, 0, 0],
    [1, 0, 0, 0],
    [1, 1, 0, 0],
]


@pytest.mark.parametrize("kind", ["theory", "topk"])
def test_dead_counter_on_a_planted_schedule(kind):
    """``steps_since_fired`` resets to 0 when a latent fires and counts up otherwise; ``dead_mask`` and
    ``dead_fraction`` read it with ``dead_steps`` (and the run's length while it is shorter)."""
    n = 4
    S = torch.tensor(SCHEDULE, dtype=torch.float32)
    # x_p = +1 on the latents that fire and -1 elsewhere; the encoder is the identity, so a latent's
    # pre-activation is its coordinate: positive exactly when scheduled (Top-k: k = 2 keeps a
    # non-positive value among the top 2 at most steps, which must not count as firing).
    batches = [(2 * row - 1)[None].repeat(3, 1) + 0.01 * torch.arange(3.0)[:, None] for row in S]
    if kind == "theory":
        model = models.build_sae(SAEConfig(n_p=n, n_m=n, kind="theory"))
        with torch.no_grad():
            model.W_m.copy_(torch.eye(n))
        extra = {}
    else:
        model = models.build_sae(SAEConfig(n_p=n, n_m=n, kind="topk", k=2))
        with torch.no_grad():
            model.W_enc.copy_(torch.eye(n))
            model.W_dec.copy_(torch.eye(n))
        extra = {"b_dec_init": "keep", "auxk_coeff": 0.0}
    cfg = train.TrainConfig(steps=len(SCHEDULE), batch_size=3, lr=1e-9, warmup_steps=0, dead_steps=2, log_every=1,
                            progress=False, threads=1, **extra)
    t = train.Trainer(model, Batches(batches), cfg)
    since = torch.zeros(n, dtype=torch.long)
    for step, row in enumerate(SCHEDULE):
        t.fit(until=step + 1)
        since = torch.where(torch.tensor(row, dtype=torch.bool), 0, since + 1)
        assert t.steps_since_fired.tolist() == since.tolist(), step
        assert t.dead_mask().tolist() == (since >= 2).tolist(), step
        horizon = min(2, step + 1)
        assert t.dead_fraction() == pytest.approx(float((since >= horizon).float().mean())), step
        assert t.history[-1]["dead_fraction"] == t.dead_fraction()
    # latent 2 never fired, latent 1 came back at the last step, latent 3 is dead again
    assert t.steps_since_fired.tolist() == [0, 0, 6, 3]


def test_batch_dead_fraction_counts_silent_columns():
    lat = np.array([[0.0, 1.0, 0.0, 2.0], [0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert metrics.dead_fraction(lat) == 0.5
    assert metrics.l0(lat) == pytest.approx(4 / 3)
    assert metrics.dense_fraction(lat, 0.5) == 0.5  # latents 1 and 3 fire on 2 of 3 samples


# ----------------------------------------------------------------------------- matching


@pytest.mark.parametrize("seed", range(5))
def test_matching_generic_non_unit_and_flipped_directions(seed):
    """Random features (no symmetric polygon, so no ties), latents planted as permuted columns with
    norms from 0.05 to 20 and a little noise, and decoys pointing *against* features with large norms:
    the matching must pair each feature with its planted latent, report its signed cosine, and
    never pick a decoy."""
    rng = np.random.default_rng(seed)
    n_p, n = 8, 5
    W = rng.standard_normal((n_p, n))
    n_m = 9
    perm = rng.permutation(n_m)[:n]
    D = rng.standard_normal((n_m, n_p)) * 0.05  # unplanted latents: small random directions
    norms = rng.uniform(0.05, 20.0, n)
    D[perm] = (W.T + 0.05 * rng.standard_normal((n, n_p))) * norms[:, None]
    free = np.setdiff1d(np.arange(n_m), perm)
    D[free[:2]] = -30.0 * W[:, :2].T  # decoys: exactly against features 0 and 1
    m = metrics.match_latents(D, W)
    np.testing.assert_array_equal(m.perm, perm)
    cos = np.array([D[perm[i]] @ W[:, i] / np.linalg.norm(D[perm[i]]) / np.linalg.norm(W[:, i]) for i in range(n)])
    np.testing.assert_allclose(m.cosines, cos, rtol=1e-12)
    assert m.mean_cosine == pytest.approx(cos.mean())
    # flipping a planted latent removes it from its feature: that feature falls to another latent
    # with positive cosine or to none, never to the flipped one
    D2 = D.copy()
    D2[perm[2]] *= -1
    m2 = metrics.match_latents(D2, W)
    assert m2.perm[2] != perm[2]
    if m2.perm[2] >= 0:
        assert m2.cosines[2] > 0 and m2.cosines[2] < cos[2]
    np.testing.assert_array_equal(np.delete(m2.perm, 2), np.delete(perm, 2))


# ----------------------------------------------------------------------------- splice KL and CE


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from wsae_core import lm as L

    texts = [f"the {w} of the {v} is {n} and the {v} of the {w} was {m}." for w, v in
             [("cat", "dog"), ("river", "hill"), ("king", "sea"), ("tree", "stone")] for n in range(8) for m in range(3)]
    lm = L.load_lm(L.make_tiny_gpt_neox(tmp_path_factory.mktemp("neox"), texts, n_layers=2, d_model=32, seed=3),
                   precision="fp32")  # the formulas in fp32 on every CPU ("auto" is bf16 where AMX is)
    with torch.no_grad():  # peaked next-token distributions (random weights give near-uniform ones, where
        lm.model.get_output_embeddings().weight.mul_(20.0)  # KL is symmetric to second order and its direction untestable)
    return lm


def test_splice_kl_and_ce_are_the_formulas(tiny_lm):
    """``kl`` is the mean over predicted tokens of KL(clean || spliced) = sum_v p_clean (log p_clean -
    log p_spliced), ``ce_*`` the mean next-token NLL, ``ce_recovered`` their ratio; all computed here
    from the model's logits with a forward hook of our own. The reversed KL differs by far more than the
    tolerance on this case, so the direction is pinned."""
    import torch.nn.functional as F

    from wsae_core import lm as L

    lm, layer, skip = tiny_lm, 0, 1
    V = lm.model.config.vocab_size
    ids = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(0))
    fn = lambda h: 4.0 * h + 1.0  # noqa: E731

    def logprobs(replace=None):
        handle = None
        if replace is not None:
            def hook(module, args, output):
                h = output[0] if isinstance(output, tuple) else output
                h = h.clone()
                h[:, skip:] = replace(h[:, skip:])
                return (h, *output[1:]) if isinstance(output, tuple) else h
            handle = lm.blocks[layer].register_forward_hook(hook)
        try:
            with torch.no_grad():
                logits = lm.model(input_ids=ids, use_cache=False).logits.double()
        finally:
            if handle is not None:
                handle.remove()
        return F.log_softmax(logits, -1)[:, skip:-1]

    targets = ids[:, skip + 1:]
    nll = lambda lp: float(-lp.gather(-1, targets[..., None]).mean())  # noqa: E731
    clean, spliced, zero = logprobs(), logprobs(fn), logprobs(torch.zeros_like)
    kl = float((clean.exp() * (clean - spliced)).sum(-1).mean())
    kl_reversed = float((spliced.exp() * (spliced - clean)).sum(-1).mean())
    res = L.splice_metrics(lm, ids, layer, {"r": fn}, skip_first=skip, batch_size=2)["r"]
    assert res.n_tokens == 3 * 10
    assert res.kl == pytest.approx(kl, rel=1e-4)
    assert abs(kl - kl_reversed) > 0.01 * kl  # a reversed KL would fail the line above
    assert res.ce_clean == pytest.approx(nll(clean), rel=1e-5)
    assert res.ce_spliced == pytest.approx(nll(spliced), rel=1e-5)
    assert res.ce_ablated == pytest.approx(nll(zero), rel=1e-5)
    assert res.ce_recovered == pytest.approx((nll(zero) - nll(spliced)) / (nll(zero) - nll(clean)), rel=1e-4)
    # Mean ablation: the spliced positions replaced by their mean over the batch and positions.
    mean = logprobs(lambda h: h.mean(dim=(0, 1), keepdim=True).expand_as(h))
    by_mean = L.splice_metrics(lm, ids, layer, {"r": fn}, skip_first=skip, batch_size=3, ablation="mean")["r"]
    assert by_mean.ce_ablated == pytest.approx(nll(mean), rel=1e-5) and abs(nll(mean) - nll(zero)) > 1e-3
    assert by_mean.ce_spliced == pytest.approx(res.ce_spliced, rel=1e-5)
    # The hook path (fast=False) gives the same numbers as skipping the blocks before the splice.
    slow = L.splice_metrics(lm, ids, layer, {"r": fn}, skip_first=skip, batch_size=2, fast=False)["r"]
    assert slow.kl == pytest.approx(res.kl, rel=1e-5) and slow.ce_spliced == pytest.approx(res.ce_spliced, rel=1e-6)
    # skip_first = 0 splices every position; the last valid value is seq - 2.
    for ok in (0, ids.shape[1] - 2):
        assert L.splice_metrics(lm, ids, layer, {"r": fn}, skip_first=ok)["r"].n_tokens == 3 * (ids.shape[1] - 1 - ok)
    with pytest.raises(ValueError, match="skip_first must be in"):
        L.splice_metrics(lm, ids, layer, {"r": fn}, skip_first=ids.shape[1] - 1)


# ----------------------------------------------------------------------------- WSAE weights


def test_splice_recovered_is_nan_when_ablation_changes_nothing(tmp_path):
    """A model whose final layer norm outputs zeros predicts the same (uniform) distribution whatever
    the residual stream holds: the ablated and clean losses are equal, so CE recovered is undefined
    (NaN, not a division by zero), and every KL is 0."""
    import math

    from wsae_core import lm as L

    texts = ["the cat sat on the mat.", "a big red fox ran."] * 10
    lm = L.load_lm(L.make_tiny_gpt_neox(tmp_path, texts, n_layers=1, d_model=16, vocab_size=200), precision="fp32")
    with torch.no_grad():
        lm.model.gpt_neox.final_layer_norm.weight.zero_()
        lm.model.gpt_neox.final_layer_norm.bias.zero_()
    ids = torch.randint(0, lm.model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    res = L.splice_layers(lm, ids, {0: {"double": lambda h: 2.0 * h}})[0]["double"]
    V = lm.model.config.vocab_size
    assert res.ce_clean == res.ce_ablated == res.ce_spliced == pytest.approx(math.log(V), rel=1e-6)
    assert math.isnan(res.ce_recovered) and res.kl == 0.0


def test_learned_oracle_gamma_inputs_that_mean_the_same():
    """Atoms of any norm, as a tensor (even one that requires grad), array or list, and ``alive`` as
    booleans or 0/1 give the same Γ as the Frobenius-optimal Γ of the kept unit atoms."""
    from wsae_core import weights

    W_p = geometry.superposition_matrix([3, 2])  # n_p = 3, n = 5
    D = W_p.T * np.array([0.5, 2.0, 7.0, 1.0, 0.1])[:, None]
    want = weights.oracle_gamma(W_p)
    for form in (D, D.tolist(), torch.tensor(D, requires_grad=True)):
        torch.testing.assert_close(weights.learned_oracle_gamma(form), want)
    extra = np.vstack([D, np.ones((1, 3))])  # a dead latent's random row
    torch.testing.assert_close(weights.learned_oracle_gamma(extra, alive=[1, 1, 1, 1, 1, 0]), want)
    torch.testing.assert_close(weights.learned_oracle_gamma(extra, alive=[True] * 5 + [False]), want)
    one = weights.learned_oracle_gamma(np.array([[1.0, 2.0, 0.0]]), floor=0.25)  # one atom; floor passed on
    torch.testing.assert_close(one, weights.oracle_gamma(np.array([[1.0], [2.0], [0.0]]) / np.sqrt(5), floor=0.25))
    assert not torch.allclose(one, weights.oracle_gamma(np.array([[1.0], [2.0], [0.0]]) / np.sqrt(5)))
    with pytest.raises(ValueError, match="directions must be finite, got nan at"):
        weights.learned_oracle_gamma(np.array([[1.0, np.nan, 0.0], [1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="zero row"):
        weights.learned_oracle_gamma(np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]]))


def test_variance_gamma_passes_its_quantile_and_takes_tensors():
    from wsae_core import weights

    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 2.0, 3.0, 4.0])
    var = x.double().var(0)
    for q in (0.25, 0.5):
        got = weights.variance_gamma(x, 1.0, "winsorised", quantile=q)
        want = var.clamp_max(torch.quantile(var, q))
        torch.testing.assert_close(got, (want / want.pow(2).mean().sqrt()).float())
    torch.testing.assert_close(weights.variance_gamma(x.requires_grad_(), 0.5), weights.variance_gamma(x.detach().numpy(), 0.5))


def test_wsae_loss_is_the_formula_and_checks_gamma():
    from wsae_core import weights

    x = np.random.default_rng(0).standard_normal((7, 3))
    xh = np.random.default_rng(1).standard_normal((7, 3))
    gamma = np.array([0.5, 1.0, 2.0])
    assert float(weights.wsae_loss(x, xh, gamma)) == pytest.approx((((x - xh) * gamma) ** 2).sum(1).mean(), rel=1e-6)
    assert float(weights.wsae_loss(x, xh)) == pytest.approx(((x - xh) ** 2).sum(1).mean(), rel=1e-12)
    with pytest.raises(ValueError, match="length n_p = 3"):
        weights.wsae_loss(x, xh, np.ones(4))


def test_gamma_rules_defaults_bounds_and_floors():
    from wsae_core import weights

    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.05, 0.1, 0.2])
    # defaults: raw variances, alpha = 1; the smallest legal sample (2 rows) and quantile 1 are accepted
    torch.testing.assert_close(weights.dimension_variance(x), x.double().var(0))
    torch.testing.assert_close(weights.make_gamma("variance", n_p=3, x_p=x), weights.variance_gamma(x, 1.0))
    torch.testing.assert_close(weights.make_gamma("variance", n_p=3, x_p=x, estimate="unit_rms"),
                               weights.variance_gamma(x, 1.0, "unit_rms"))
    assert weights.dimension_variance(x[:2]).shape == (3,)
    torch.testing.assert_close(weights.dimension_variance(x, "winsorised", 1.0), x.double().var(0))
    # unit_rms on small activations (every rms < 1) is fine
    r = x.double() / x.double().pow(2).mean(1, keepdim=True).sqrt()
    torch.testing.assert_close(weights.dimension_variance(x, "unit_rms"), r.var(0))
    for bad, match in [(x[:1], "batch >= 2"), (x[0], "batch >= 2"), (x.numpy() * np.nan, r"x_p must be finite, got nan at \[0, 0\] \(the variance rule")]:
        with pytest.raises(ValueError, match=match):
            weights.dimension_variance(bad)
    with pytest.raises(ValueError, match="quantile"):
        weights.dimension_variance(x, "winsorised", 0)
    const = x.clone()
    const[:, 2] = 1.0
    with pytest.raises(ValueError, match=r"x_p\[:, 2\]"):
        weights.dimension_variance(const)
    with pytest.raises(ValueError, match="alpha"):
        weights.variance_gamma(x, True)
    # n_p is checked against every rule's result
    W_p = geometry.superposition_matrix([3, 2])
    for kw in ({"rule": "variance", "x_p": x}, {"rule": "oracle", "W_p": W_p}, {"rule": "learned_oracle", "directions": W_p.T}):
        with pytest.raises(ValueError, match="length n_p = 4"):
            weights.make_gamma(n_p=4, **kw)
    D = np.vstack([W_p.T, np.ones((1, 3))])
    alive = [True] * 5 + [False]
    torch.testing.assert_close(weights.make_gamma("learned_oracle", n_p=3, directions=D, alive=alive),
                               weights.learned_oracle_gamma(D, alive))
    assert not torch.allclose(weights.learned_oracle_gamma(D, alive), weights.learned_oracle_gamma(D))
    # the floor is floor * max(γ) before normalising: the floored dimension sits at that ratio
    g = weights.learned_oracle_gamma(np.array([[1.0, 2.0, 0.0]]), floor=0.25)
    assert float(g.min() / g.max()) == pytest.approx(0.25)
    assert weights.uniform_gamma(1).tolist() == [1.0]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="n_p"):
            weights.uniform_gamma(bad)


# ----------------------------------------------------------------------------- metrics: edges and errors


def test_metric_edges_against_their_definitions():
    x = np.array([[1.0, 0.0, 2.0], [0.0, 0.0, -2.0], [0.5, 0.0, 0.0]])
    lat = np.array([[0.8, 0.0, 0.5], [0.3, 0.1, 0.2], [0.25, 0.0, 0.0]])
    # vanished: active coordinates whose latent is <= tol, without a matching (latents aligned with x)
    assert metrics.vanished_fraction(x, lat) == pytest.approx(0 / 4)
    assert metrics.vanished_fraction(x, lat, tol=0.25) == pytest.approx(2 / 4)  # 0.2 and 0.25 <= tol
    assert metrics.vanished_fraction(x, lat, tol=0.2499) == pytest.approx(1 / 4)
    assert metrics.vanished_fraction(x, lat, tol=0) == 0.0
    assert metrics.vanished_fraction(np.zeros((2, 3)), lat[:2]) == 0.0  # nothing active: nothing vanished
    for tol in (True, -1.0, np.inf, "0.1"):
        with pytest.raises(ValueError, match="tol"):
            metrics.vanished_fraction(x, lat, tol=tol)
    # shrinkage: sum of matched latents over sum of x where x is active; a column whose active values
    # sum to 0 is divided by 1, a never-active column is NaN
    s = metrics.feature_shrinkage(x, lat)
    np.testing.assert_allclose(s[[0]], [(0.8 + 0.25) / 1.5])
    assert np.isnan(s[1])
    assert s[2] == pytest.approx(0.5 + 0.2)
    # dense: fires on more than threshold of the samples (exactly the threshold is not more)
    assert metrics.dense_fraction(lat, 2 / 3) == 1 / 3  # latent 0 fires on 3/3; latent 2 on 2/3
    assert metrics.dense_fraction(lat, 0) == 1.0 and metrics.dense_fraction(lat, 1) == 0.0
    for th in (True, -0.1, 1.1):
        with pytest.raises(ValueError, match="threshold"):
            metrics.dense_fraction(lat, th)
    # fvu: small variances are fine, a constant batch is an error
    tiny = 1e-3 * np.random.default_rng(0).standard_normal((10, 3))
    assert metrics.fvu(tiny, 0 * tiny) == pytest.approx((tiny**2).sum() / ((tiny - tiny.mean(0)) ** 2).sum())
    with pytest.raises(ValueError, match="zero variance"):
        metrics.fvu(np.ones((4, 3)), np.zeros((4, 3)))


@pytest.mark.parametrize("call, name", [
    (lambda bad: metrics.reconstruction_error(bad, np.zeros((2, 2))), "x_p"),
    (lambda bad: metrics.reconstruction_error(np.zeros((2, 2)), bad), "x_hat"),
    (lambda bad: metrics.fvu(bad, np.zeros((2, 2))), "x_p"),
    (lambda bad: metrics.fvu(np.eye(2), bad), "x_hat"),
    (lambda bad: metrics.l0(bad), "latents"),
    (lambda bad: metrics.dead_fraction(bad), "latents"),
    (lambda bad: metrics.dense_fraction(bad), "latents"),
    (lambda bad: metrics.feature_shrinkage(bad, np.eye(2)), "x"),
    (lambda bad: metrics.feature_shrinkage(np.eye(2), bad), "latents"),
    (lambda bad: metrics.feature_shrinkage(np.eye(2), bad, np.array([0, 1])), "latents"),
    (lambda bad: metrics.vanished_fraction(bad, np.eye(2)), "x"),
    (lambda bad: metrics.vanished_fraction(np.eye(2), bad), "latents"),
    (lambda bad: metrics.ground_truth_error(bad, np.eye(2)), "x"),
    (lambda bad: metrics.match_latents(bad, np.eye(2)), "directions"),
    (lambda bad: metrics.match_latents(np.eye(2), bad), "W_p"),
])
def test_metric_errors_name_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"^{name} must be 2-D, got shape \(2,\)"):
        call(np.ones(2))


def test_gamma_rule_inputs_keep_float64_and_reject_bad_shapes():
    from wsae_core import weights

    # a list of Python floats is read as float64: a 1e-9 difference is a variance, not rounding noise
    var = weights.dimension_variance([[1.0, 0.0], [1.0 + 1e-9, 1.0]])
    assert float(var[0]) == pytest.approx(0.5e-18, rel=1e-6)
    with pytest.raises(ValueError, match="quantile"):
        weights.dimension_variance(np.eye(3), "winsorised", True)
    for bad in (np.ones(3), np.zeros((0, 3))):
        with pytest.raises(ValueError, match="matrix of atoms"):
            weights.learned_oracle_gamma(bad)


def test_ground_truth_error_edges_and_perm_errors():
    x = np.array([[1.0, 0.0], [0.0, 2.0]])
    lat = np.array([[0.5, 0.25], [0.0, 1.0]])
    gt = metrics.ground_truth_error(x, lat)
    assert gt.nonzero == pytest.approx((0.5**2 + 1.0**2) / 2)
    assert gt.zero == pytest.approx(0.25**2 / 2)
    assert gt.all == pytest.approx((0.25 + 0.0625 + 1.0) / 2) and gt.unmatched == 0.0
    # nothing active, or everything active: the empty part is 0, not NaN
    assert metrics.ground_truth_error(np.zeros((2, 2)), lat).nonzero == 0.0
    assert metrics.ground_truth_error(np.ones((2, 2)), lat).zero == 0.0
    for bad in (np.array([[0, 1]]), np.array([0.0, 1.0]), np.array([0, -2]), np.array([0, 2])):
        with pytest.raises(ValueError, match="perm"):
            metrics.ground_truth_error(x, lat, bad)
    assert metrics.ground_truth_error(x, lat, np.array([-1, 1])).all > 0  # -1 = no latent: allowed
    for call in (lambda: metrics.ground_truth_error(x, lat * np.nan), lambda: metrics.l0(lat * np.nan)):
        with pytest.raises(ValueError, match=r"^latents must be finite, got nan at \[0, 0\]"):
            call()
