"""The verdict words the chapters glue into their text are chosen by the numbers, never typed."""

import numpy as np
import pytest

from wsae_core.experiments import synthetic, theory


def _records(changes: dict[str, list[float]], S_grid=(0.0, 0.9), base=1.0):
    """Synthetic sweep records: ``changes[method][seed]`` is the relative change at every S."""
    recs = []
    for S in S_grid:
        for seed in range(len(next(iter(changes.values())))):
            recs.append({"model": "theory", "S": S, "seed": seed, "method": "SAE", "l_gt_nonzero": base,
                         "recon_x_p": base})
            for m, ch in changes.items():
                recs.append({"model": "theory", "S": S, "seed": seed, "method": m,
                             "l_gt_nonzero": base * (1 + ch[seed]), "recon_x_p": base * (1 + 2 * ch[seed])})
    return recs


def test_change_verdict_uses_the_interval():
    assert synthetic.change_verdict(-0.05, 0.01) == "lower"
    assert synthetic.change_verdict(0.05, 0.01) == "higher"
    assert synthetic.change_verdict(-0.05, 0.06) == "no clear change"
    assert synthetic.change_verdict(-0.05, float("nan")) == "no clear change"


def test_paired_change_t_interval():
    recs = _records({"WSAE oracle": [-0.10, -0.12, -0.08]})
    ch = synthetic.paired_change(recs, "l_gt_nonzero", "theory", "WSAE oracle")
    assert ch["mean"] == pytest.approx([-0.10, -0.10])
    sem = np.std([-0.10, -0.12, -0.08], ddof=1) / np.sqrt(3)
    assert ch["ci"] == pytest.approx([4.302653 * sem] * 2, rel=1e-5)  # t(0.975, 2 df)
    assert list(ch["n"]) == [3, 3]
    with pytest.raises(ValueError, match="level"):
        synthetic.paired_change(recs, "l_gt_nonzero", "theory", "WSAE oracle", level=1.5)


def test_sentences_follow_the_numbers():
    clear = _records({"WSAE oracle": [-0.10, -0.12, -0.08], "WSAE α=1": [0.01, -0.02, 0.005]})
    text = synthetic.describe_method(clear, "theory", "WSAE oracle")
    assert "lower at $S = 0$ (−10.0 %" in text and "higher" not in text
    quiet = synthetic.describe_method(clear, "theory", "WSAE α=1")
    assert "no change beyond its 95 % interval at any of the 2 sparsities" in quiet
    said = synthetic.overall(clear)
    assert "theory SAE: at $S \\in \\{0, 0.9\\}$ (largest: WSAE oracle" in said["helps"]
    assert "theory SAE: at no sparsity" in said["hurts"]
    flipped = synthetic.overall(_records({"WSAE oracle": [0.10, 0.12, 0.08], "WSAE α=1": [0.01, -0.02, 0.005]}))
    assert "theory SAE: at no sparsity" in flipped["helps"] and "WSAE oracle, +10.0 %" in flipped["hurts"]


def _theory_record(config, S, seed, ratio, dist, l_sae, l_sae_cf, W_m):
    return {"config": config, "S": S, "seed": seed, "ratio": ratio, "n_m": len(W_m), "dist_closed_form": dist,
            "l_sae": l_sae, "l_sae_closed_form": l_sae_cf, "l_gt_nonzero": 0.05, "mean_cosine": 0.8,
            "W_m": W_m}


def test_theory_verdicts_follow_the_numbers():
    W = np.eye(2)
    far = [_theory_record("two squares", S, s, 1, 0.6, 1e-8, 0.0, (W * (1 + s)).tolist())
           for S in (0.0, 0.99) for s in (0, 1)]
    F = theory.findings(far)
    V = theory.verdicts(F)
    assert V["reached_word"] == "Never" and V["reached"] == "0 %" and V["t3_word"] == "do not agree"
    assert "reconstructs every $x_p$" in V["cfg_two_squares"]
    near = [_theory_record("two squares", S, s, 1, 0.01, 1e-8, 0.0, W.tolist()) for S in (0.0, 0.99) for s in (0, 1)]
    V = theory.verdicts(theory.findings(near))
    assert V["reached_word"] == "Always" and V["t3_word"] == "agree"
