"""Smoke tests of the synthetic and theory runners (tiny sizes, in-process)."""

import numpy as np
import pytest

from wsae_core.experiments import synthetic, theory


def test_synthetic_runner_tiny():
    spec = synthetic.spec_for("ci", S_grid=(0.9,), seeds=(0, 1), steps=5, batch_size=64, eval_samples=256,
                              n=40, n_p=10, n_m=40)
    recs = synthetic.run_synthetic(spec, workers=1)
    assert len(recs) == 1 * 2 * 2 * 4
    assert {r["method"] for r in recs} == {m[0] for m in synthetic.METHODS}
    s = synthetic.summarise(recs, "l_gt_nonzero", "theory")
    assert set(s) == {m[0] for m in synthetic.METHODS} and s["SAE"]["mean"].shape == (1,)
    ch = synthetic.paired_change(recs, "l_gt_nonzero", "theory", "WSAE oracle")
    assert np.isfinite(ch["mean"]).all()
    assert "S" in synthetic.summary_table(recs, "recon_x_p", "topk")
    # Paired design: same seed -> same initialisation and data; uniform rule = SAE exactly.
    again = synthetic.run_synthetic(spec, workers=1)
    assert [r["l_gt"] for r in again] == [r["l_gt"] for r in recs]


def test_synthetic_spec_errors_and_k():
    with pytest.raises(ValueError, match="methods must be among"):
        synthetic.SyntheticSpec(methods=("SAE", "magic"))
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
