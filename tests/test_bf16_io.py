"""bf16 for language-model activations: the LM forward under bf16 autocast (where chosen) and the
bf16 activation cache (half the bytes, read back as fp32 or bf16), on a tiny GPT-NeoX."""

import numpy as np
import pytest
import torch

from wsae_core import activations as A
from wsae_core import corpus as C
from wsae_core import lm as L
from wsae_core import models


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    docs = C.wiki_documents()[:200]
    return L.make_tiny_gpt_neox(tmp_path_factory.mktemp("neox"), [d.text for d in docs], n_layers=2, d_model=32)


@pytest.fixture(scope="module")
def contexts(folder):
    tok = L.load_lm(folder, precision="fp32").tokenizer
    return C.tokenize_contexts(C.wiki_documents(), tok, context_len=16, n_contexts=20, seed=0, source="wiki")


def test_lm_precision_choice(folder, monkeypatch):
    assert L.load_lm(folder, precision="fp32").compute_dtype == torch.float32
    assert L.load_lm(folder, precision="bf16").compute_dtype == torch.bfloat16
    monkeypatch.setattr(models, "cpu_capabilities", lambda: {"amx_bf16": True})
    assert L.load_lm(folder).compute_dtype == torch.bfloat16  # "auto" on a CPU with AMX
    monkeypatch.setattr(models, "cpu_capabilities", lambda: {"avx2": True})
    assert L.load_lm(folder).compute_dtype == torch.float32  # "auto" where bf16 is emulated


def test_bf16_forward_close_to_fp32(folder, contexts):
    ids = torch.from_numpy(contexts.tokens[:4])
    r32 = L.capture_residuals(L.load_lm(folder, precision="fp32"), ids, [1])[1]
    r16 = L.capture_residuals(L.load_lm(folder, precision="bf16"), ids, [1])[1]
    assert r16.dtype == torch.float32  # hooks hand out fp32 either way
    rel = float((r16 - r32).norm() / r32.norm())
    assert 0 < rel < 2e-2  # bf16 rounding, not a different computation


def test_bf16_cache_half_the_bytes_same_values(folder, contexts, tmp_path):
    lm = L.load_lm(folder, precision="fp32")
    c32 = A.build_activation_cache(lm, contexts, [0, 1], root=tmp_path, shard_contexts=8, dtype="float32")
    c16 = A.build_activation_cache(lm, contexts, [0, 1], root=tmp_path, shard_contexts=8, dtype="bfloat16")
    assert c16.folder != c32.folder and c16.dtype == "bfloat16"
    assert c16.nbytes < 0.6 * c32.nbytes  # tokens/labels are shared overhead; the activations halve
    index = np.random.default_rng(0).permutation(c32.n_tokens)[:50]
    want = torch.from_numpy(c32.gather(1, index)).to(torch.bfloat16)  # round-to-nearest of the fp32 cache
    got16 = c16.gather_tensor(1, index, torch.bfloat16)
    got32 = c16.gather_tensor(1, index)
    assert got16.dtype == torch.bfloat16 and got32.dtype == torch.float32
    assert torch.equal(got16, want) and torch.equal(got32, want.float())
    assert np.array_equal(c16.gather(1, index), want.float().numpy())
    for dtype in (torch.float32, torch.bfloat16):
        src = A.CacheSource(c16, 1, scale=2.0, dtype=dtype)
        x = src.sample(30, torch.Generator().manual_seed(0))
        assert x.dtype == dtype and x.shape == (30, 32)
        assert c16.read_speed(1, batch_size=64, n_batches=2, dtype=dtype) > 0
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.bfloat16"):
        A.CacheSource(c16, 1, dtype=torch.float16)


def test_bf16_forward_gets_its_own_cache(folder, contexts, tmp_path):
    a = A.build_activation_cache(L.load_lm(folder, precision="fp32"), contexts, [0], root=tmp_path)
    b = A.build_activation_cache(L.load_lm(folder, precision="bf16"), contexts, [0], root=tmp_path)
    assert "forward" not in a.meta["key"] and b.meta["key"]["forward"] == "bf16"
    assert a.folder != b.folder
