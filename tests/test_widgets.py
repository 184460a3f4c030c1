import numpy as np
import pytest
from required import require

from wsae_core import geometry, widgets


def test_orthogonal_features_are_recovered_exactly():
    e = widgets.explore("two features at angle θ", S=0.3, theta_deg=90.0, n_mc=2_000)
    assert e.L_SAE == pytest.approx(0.0, abs=1e-12)
    assert e.L_GT == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(e.x_m, e.x, atol=1e-12)


def test_digon_hides_all_error_from_the_sae_loss():
    # w and -w: W_p^T W_p x reconstructs x_p exactly, yet a feature is lost whenever both fire.
    e = widgets.explore("two features at angle θ", S=0.0, theta_deg=180.0, n_mc=4_000)
    assert e.L_SAE == pytest.approx(0.0, abs=1e-12)
    # x_m = ((x1 - x2)+, (x2 - x1)+): the smaller feature vanishes and the larger shrinks by it, so
    # ||x - x_m||^2 = 2 min(x1, x2)^2, and E[min^2] = 1/6 for two Uniform[0, 1] values: L_GT = 1/3.
    assert e.L_GT == pytest.approx(1 / 3, abs=5 * e.se_GT)
    assert e.gap < 0


def test_triangle_gap_is_negative_and_matches_theorem4_sign():
    e = widgets.explore("triangle", S=0.5, n_mc=4_000)
    assert e.gap < 0 and e.weighted_gap < 0
    assert geometry.has_nonpositive_interference(e.W_p)


def test_alpha_zero_is_the_plain_sae():
    e = widgets.explore("monosemantic + digon", S=0.4, alpha=0.0, n_mc=2_000)
    np.testing.assert_allclose(e.gamma, 1.0)
    assert e.L_WSAE == pytest.approx(e.L_SAE)


def test_shrunk_and_vanished_flags_on_the_poster_example():
    # Rebuild the poster's shrinking example inside an Exploration to test the flags.
    W_p = geometry.superposition_matrix([1, 2])
    x = np.array([0.5, 1.0, 0.8])
    x_m = geometry.recover(geometry.closed_form_sae(W_p, 3), W_p @ x)
    e = widgets.Exploration("poster", 0.0, 0.0, W_p, x, x_m, np.ones(2), 0, 0, 0, 0, 0, 1)
    assert e.shrunk.tolist() == [False, True, False]
    assert e.vanished.tolist() == [False, False, True]


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="hexagon", S=0.5), "geometry must be one of"),
    (dict(name="triangle", S=1.0), "S must be in"),
    (dict(name="triangle", S=0.5, alpha=-1.0), "alpha must be"),
    (dict(name="triangle", S=0.5, theta_deg=float("nan")), "theta_deg must be finite"),
])
def test_bad_input_names_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        widgets.explore(n_mc=100, **kwargs)


def test_precomputed_explorer_holds_one_frame_per_setting():
    html = widgets.precomputed_explorer(["triangle", "square"], [0.0, 0.9], n_mc=500)
    assert html.count("iVBORw0KGgo") == 4  # PNG signature, base64
    assert '<select class="wsae-geom">' in html and 'type="range"' in html
    with pytest.raises(ValueError, match="at least one geometry"):
        widgets.precomputed_explorer([], [0.5])


def test_playground_builds_its_controls():
    require("ipywidgets")
    ui = widgets.playground(n_mc=200)
    descriptions = [c.description for c in ui.children[0].children[0].children]
    assert descriptions == ["geometry", "sparsity S", "WSAE α", "free angle θ (°)", "sample seed"]


def test_train_pair_trains_both_losses_from_one_start():
    res = widgets.train_pair("triangle", S=0.5, alpha=1.0, steps=60, n_eval=2_000)
    assert list(res) == ["SAE", "WSAE α=1"]
    for m in res.values():
        assert 0 < m["l_gt"] < 1 and 0 <= m["mean_cosine"] <= 1
