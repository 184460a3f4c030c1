"""Tests for wsae_core.data: the sparse sampler, superposition, the n = 200, n_p = 20 generators."""

import numpy as np
import pytest
import torch

from wsae_core import data, geometry


@pytest.mark.parametrize("S", [0.0, 0.5, 0.8, 0.9, 0.99, 0.999])
def test_sparsity_and_values(S):
    x = data.sample_sparse(2000, 200, S, seed=1)
    assert x.shape == (2000, 200) and x.dtype == torch.float32
    frac_zero = (x == 0).float().mean().item()
    n = x.numel()
    assert abs(frac_zero - S) < 5 * np.sqrt(S * (1 - S) / n) + 1e-4
    active = x[x != 0]
    assert active.min() > 0 and active.max() < 1
    if active.numel() > 1000:
        assert abs(active.mean().item() - 0.5) < 0.02


def test_positions_are_uniform_over_batch_and_features():
    # The geometric-gap path must not favour early positions.
    x = data.sample_sparse(4000, 50, 0.95, seed=0)
    per_feature = (x != 0).float().mean(0)
    per_row_half = (x[:2000] != 0).float().mean(), (x[2000:] != 0).float().mean()
    assert torch.all((per_feature - 0.05).abs() < 0.02)
    assert abs(per_row_half[0] - per_row_half[1]) < 0.005


def test_seed_and_generator_reproducible():
    a = data.sample_sparse(64, 30, 0.9, seed=7)
    b = data.sample_sparse(64, 30, 0.9, seed=7)
    assert torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(data.sample_sparse(8, 10, 0.5, generator=g1), data.sample_sparse(8, 10, 0.5, generator=g2))
    assert not torch.equal(data.sample_sparse(8, 10, 0.5, generator=g1), data.sample_sparse(8, 10, 0.5, generator=g1))


@pytest.mark.parametrize("values", ["exponential", "constant"])
def test_value_distributions(values):
    for S in (0.3, 0.95):
        x = data.sample_sparse(3000, 100, S, seed=2, values=values)
        active = x[x != 0]
        assert abs(active.mean().item() - 1.0) < 0.05


@pytest.mark.parametrize("bad", [1.0, 1.2, -0.1, float("nan"), "0.5", True])
def test_bad_sparsity(bad):
    with pytest.raises(ValueError, match="S must"):
        data.sample_sparse(4, 4, bad)


def test_bad_sizes_and_values():
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        data.sample_sparse(0, 4, 0.5)
    with pytest.raises(ValueError, match="values must be one of"):
        data.sample_sparse(2, 4, 0.5, values="normal")


def test_superpose_shapes():
    W = geometry.superposition_matrix([1, 2])
    x = torch.tensor([[0.5, 1.0, 0.8]])
    assert torch.allclose(data.superpose(x, W), torch.tensor([[0.5, 0.2]], dtype=x.dtype), atol=1e-6)
    with pytest.raises(ValueError, match="to match W_p"):
        data.superpose(torch.zeros(2, 4), W)


def test_polygon_layout_paper_setting():
    blocks = data.polygon_layout(200, 20)
    W = geometry.superposition_matrix(blocks)
    assert W.shape == (20, 200)
    assert blocks[:6] == [1, 1, 1, 1, 2, 2] and min(blocks[6:]) >= 27
    with pytest.raises(ValueError, match="each polygon needs >= 3"):
        data.polygon_layout(12, 10, n_mono=0, n_digons=0)


@pytest.mark.parametrize("kind", ["random", "polygons"])
def test_synthetic_superposition_has_positive_interference(kind):
    W = data.synthetic_superposition(kind)
    assert W.shape == (20, 200)
    assert np.allclose(np.linalg.norm(W, axis=0), 1.0)
    # n = 200 > 2 n_p = 40: positive interference is unavoidable.
    assert not geometry.has_nonpositive_interference(W)


def test_toy_model_superposition_small():
    W = data.toy_model_superposition(12, 4, S=0.9, steps=150, batch=256, seed=0)
    assert W.shape == (4, 12)
    assert np.allclose(np.linalg.norm(W, axis=0), 1.0)
    W2 = data.toy_model_superposition(12, 4, S=0.9, steps=150, batch=256, seed=0)
    assert np.array_equal(W, W2)
    raw = data.toy_model_superposition(12, 4, S=0.9, steps=150, batch=256, seed=0, normalise=False)
    assert np.linalg.norm(raw, axis=0).max() > 0.5  # the toy model learned some features


def test_bad_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        data.synthetic_superposition("spiral")


def test_sources():
    W = geometry.superposition_matrix([1, 2, 3])
    src = data.SparseSource(W, 0.7)
    g = torch.Generator().manual_seed(0)
    x, x_p = src.sample_pair(16, g)
    assert x.shape == (16, 6) and x_p.shape == (16, 4)
    assert torch.allclose(x_p, x @ src.W_p.T)
    acts = torch.randn(100, 5)
    ts = data.TensorSource(acts)
    assert ts.sample(7, g).shape == (7, 5)
    with pytest.raises(ValueError, match="non-empty"):
        data.TensorSource(torch.zeros(0, 3))
