"""Smoke tests of the synthetic and theory runners (tiny sizes, in-process)."""

import numpy as np
import pytest

from wsae_core.experiments import synthetic, theory


def test_synthetic_runner_tiny():
    spec = synthetic.spec_for("ci", S_grid=(0.9,), seeds=(0, 1), steps=5, batch_size=64, eval_samples=256,
                              n=40, n_p=10, n_m=40)
    recs = synthetic.run_synthetic(spec, workers=1)
    assert len(recs) == 1 * 2 * 2 * len(synthetic.METHODS)
    assert {r["method"] for r in recs} == {m[0] for m in synthetic.METHODS}
    s = synthetic.summarise(recs, "l_gt_nonzero", "theory")
    assert set(s) == {m[0] for m in synthetic.METHODS} and s["SAE"]["mean"].shape == (1,)
    ch = synthetic.paired_change(recs, "l_gt_nonzero", "theory", "WSAE oracle")
    assert np.isfinite(ch["mean"]).all()
    assert "S" in synthetic.summary_table(recs, "recon_x_p", "topk")
    # Paired design: same seed -> same initialisation and data; uniform rule = SAE exactly.
    again = synthetic.run_synthetic(spec, workers=1)
    assert [r["l_gt"] for r in again] == [r["l_gt"] for r in recs]
    for r in recs:  # every Γ normalised to mean γ² = 1; dead latents and the training curve beside every result
        assert np.mean(np.square(r["gamma"])) == pytest.approx(1.0, rel=1e-5)
        assert 0 <= r["dead"] <= 1 and 0 <= r["train_dead"] <= 1 and len(r["curve"]["fvu"]) >= 1
    assert all(not np.allclose(r["gamma"], 1.0) for r in recs if r["method"] == "WSAE learned oracle")
    assert "dead latents" in synthetic.dead_table(recs, "topk")


def test_gammas_both_signs_and_estimates():
    from wsae_core.data import synthetic_superposition

    W = synthetic_superposition("polygons", 200, 20, seed=0)
    g = synthetic.gammas_for(W, 0.999, seed=0)  # most samples have no active feature: unit-RMS leaves them out
    assert "WSAE learned oracle" not in g
    load = (W ** 2).sum(1)
    for est in ("", " winsor", " unit-RMS"):
        up, down = g[f"WSAE α=1{est}"], g[f"WSAE α=-1{est}"]
        assert np.corrcoef(up, load)[0, 1] > 0 > np.corrcoef(down, load)[0, 1]
        assert np.mean(up ** 2) == pytest.approx(1.0, rel=1e-5) and np.mean(down ** 2) == pytest.approx(1.0, rel=1e-5)
    assert np.abs(g["WSAE α=1 winsor"] - g["WSAE α=1"]).max() > 0  # the largest variance was clipped


def _planted(changes, S_grid=(0.0, 0.9)):
    recs = []
    for S in S_grid:
        for seed in range(3):
            recs.append({"model": "theory", "S": S, "seed": seed, "method": "SAE", "l_gt_nonzero": 1.0})
            for m, ch in changes.items():
                recs.append({"model": "theory", "S": S, "seed": seed, "method": m,
                             "l_gt_nonzero": 1.0 + (ch[seed] if S == 0.0 else 0.01 * (seed - 1))})
    return recs


def test_oracle_recovery_verdicts_follow_the_numbers():
    recs = _planted({"WSAE oracle": [-0.10, -0.11, -0.09], "WSAE α=-1": [-0.10, -0.12, -0.09],
                     "WSAE α=1": [0.05, 0.06, 0.04], "WSAE learned oracle": [-0.02, -0.03, -0.025]})
    v = synthetic.oracle_recovery(recs, "theory")
    assert v["oracle"]["gains"] == [0.0]
    assert v["raw variance, α < 0"]["word"] == "recovers"
    assert v["raw variance, α > 0"]["word"] == "does not" and v["raw variance, α > 0"]["short"]["WSAE α=1"] == [0.0]
    lo = v["learned oracle"]
    assert lo["word"] == "partly" and lo["recovered"]["WSAE learned oracle"] == [0.0]
    assert lo["short"]["WSAE learned oracle"] == [0.0] and "falls short of the oracle at $S \\in \\{0\\}$" in lo["text"]
    none = synthetic.oracle_recovery(_planted({"WSAE oracle": [0.01, -0.01, 0.0], "WSAE α=-1": [-0.1, -0.1, -0.1]}), "theory")
    assert none["raw variance, α < 0"]["word"] == "nothing to recover"


def test_synthetic_spec_errors_and_k():
    with pytest.raises(ValueError, match="methods must be among"):
        synthetic.SyntheticSpec(methods=("SAE", "magic"))
    with pytest.raises(ValueError, match="needs 'SAE' in methods"):
        synthetic.SyntheticSpec(methods=("WSAE oracle", "WSAE learned oracle"))
    assert synthetic.topk_k(200, 0.99, 200) == 2
    assert synthetic.topk_k(200, 0.999, 200) == 1
    assert synthetic.topk_k(200, 0.0, 100) == 100


def test_theory_runner_tiny():
    spec = theory.spec_for("ci", configs=("mono+digon+triangle",), S_grid=(0.9,), seeds=(0, 1), steps=5,
                           batch_size=64, eval_samples=256)
    recs = theory.run_theory(spec, workers=1)
    assert len(recs) == 2 + 2  # n_m = n and n_m = 2n at the largest S
    assert "~W_pᵀ" in theory.summary_table(recs)
    W = theory.config_matrix("mono+digon+triangle")
    assert theory.distance_to_closed_form(np.vstack([W.T[::-1], np.zeros((2, 4))]), W) == pytest.approx(0.0)
    assert theory.seed_agreement([W.T, W.T[[1, 0, 2, 3, 4, 5]]]) == pytest.approx(0.0)
