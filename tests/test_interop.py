"""Interop with SAELens and sparsify (wsae_core.interop): our SAEs opened by the real libraries, and
theirs opened here, with the same reconstructions.

Tolerance: float32 throughout; the libraries multiply in another order (``x @ W_enc`` vs
``W_enc x``, the scale folded into the biases), so reconstructions and latents are compared with
``rtol = 1e-5`` and ``atol = 1e-5 * max|x|``, and the sets of active latents exactly.

The round trips through the real libraries need the test extra (``requirements-test.txt``,
installed by ``make test``). Without it they are skipped, unless ``WSAE_REQUIRE_TEST_EXTRA`` is set
(``make test`` sets it), where a missing library is a failure.
"""

from __future__ import annotations

import importlib
import json
import os

import numpy as np
import pytest
import torch

from wsae_core import interop as X
from wsae_core.models import PracticalSAE, SAEConfig, TheorySAE, build_sae

N_P, N_M, K = 24, 96, 6
SCALE = 3.7
KINDS = ("theory", "relu", "topk")


def _lib(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("WSAE_REQUIRE_TEST_EXTRA"):
            raise
        pytest.skip(f"{name} not installed (pip install -r requirements-test.txt)")


def _model(kind: str, seed: int = 0):
    cfg = SAEConfig(n_p=N_P, n_m=N_M, kind=kind, k=K if kind == "topk" else None,
                    l1_coeff=1e-3 if kind == "relu" else 0.0, seed=seed)
    m = build_sae(cfg)
    if isinstance(m, PracticalSAE):
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():  # trained SAEs have non-zero biases: make the test see them
            m.b_enc.copy_(0.1 * torch.randn(N_M, generator=g))
            m.b_dec.copy_(0.3 * torch.randn(N_P, generator=g))
    return m.eval()


def _portable(kind: str) -> X.PortableSAE:
    gamma = torch.linspace(0.5, 1.5, N_P) if kind != "theory" else None
    return X.PortableSAE(_model(kind), scale=SCALE if kind != "theory" else 1.0, gamma=gamma,
                         meta={"layer": 3, "model_name": "EleutherAI/pythia-160m", "method": "WSAE α=1", "alpha": 1.0})


@pytest.fixture(scope="module")
def x():
    g = torch.Generator().manual_seed(7)
    return SCALE * torch.randn(256, N_P, generator=g) + 0.5


def _close(a, b, x):
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5 * float(x.abs().max()))


# ----------------------------------------------------------------------------- without the libraries


@pytest.mark.parametrize("fmt", X.FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_keeps_weights_gamma_and_reconstructions(tmp_path, x, fmt, kind):
    sae = _portable(kind)
    out = X.to_sparsify(sae, tmp_path) if fmt == "sparsify" else (X.to_saelens if fmt == "saelens" else X.to_wsae)(sae, tmp_path / "sae")
    back = X.load(out)
    assert X.detect_format(out) == fmt
    assert type(back.model) is type(sae.model) and back.model.cfg.kind == kind
    assert back.model.cfg.k == sae.model.cfg.k and back.model.cfg.seed == sae.model.cfg.seed
    assert back.scale == sae.scale and back.layer == 3 and back.meta["alpha"] == 1.0
    if sae.gamma is None:
        assert back.gamma is None
    else:
        assert torch.equal(back.gamma, sae.gamma)  # Γ exactly, through JSON
    for name, p in sae.model.state_dict().items():
        q = back.model.state_dict()[name]
        if name.startswith("W"):
            assert torch.equal(p, q), name  # weight matrices are copied, never recomputed
        else:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # biases: x c, then / c
    _close(back.reconstruct(x), sae.reconstruct(x), x)


def test_exported_files_name_model_hook_and_carry_gamma(tmp_path):
    sae = _portable("topk")
    cfg = json.loads((X.to_saelens(sae, tmp_path / "lens") / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == K and cfg["d_in"] == N_P and cfg["d_sae"] == N_M
    assert cfg["metadata"]["model_name"] == "EleutherAI/pythia-160m"
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert len(cfg["metadata"]["wsae"]["gamma"]) == N_P and cfg["metadata"]["wsae"]["scale"] == SCALE
    folder = X.to_sparsify(sae, tmp_path / "run")
    assert folder.name == "layers.3"
    scfg = json.loads((folder / "cfg.json").read_text())
    assert scfg["k"] == K and scfg["num_latents"] == N_M and scfg["normalize_decoder"] is True
    assert json.loads((X.to_sparsify(_portable("relu"), tmp_path / "r") / "cfg.json").read_text())["k"] == N_M


def test_folding_keeps_unit_decoder_rows_and_scales_latents(tmp_path, x):
    sae = _portable("relu")
    w = X._raw_weights(sae)
    torch.testing.assert_close(w["W_dec"].norm(dim=1), torch.ones(N_M))
    raw = torch.relu((x - w["b_dec"]) @ w["W_enc"].T + w["b_enc"])  # the exported map, by hand
    _close(raw, SCALE * sae.encode(x), x)
    _close(raw @ w["W_dec"] + w["b_dec"], sae.reconstruct(x), x)


def test_an_edited_theory_sae_comes_back_untied(tmp_path, x):
    sae = _portable("theory")
    out = X.to_saelens(sae, tmp_path / "t")
    from safetensors.torch import load_file, save_file

    st = load_file(str(out / "sae_weights.safetensors"))
    st["b_enc"] = st["b_enc"] + 0.01  # e.g. fine-tuned in another tool
    save_file(st, str(out / "sae_weights.safetensors"))
    back = X.load(out)
    assert isinstance(back.model, PracticalSAE) and back.model.cfg.kind == "relu"


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        X.load(tmp_path)
    (tmp_path / "cfg.json").write_text("{}")
    with pytest.raises(ValueError, match="exactly one of"):
        X.load(tmp_path)
    out = X.to_saelens(_portable("relu"), tmp_path / "j")
    cfg = json.loads((out / "cfg.json").read_text())
    (out / "cfg.json").write_text(json.dumps({**cfg, "architecture": "jumprelu"}))
    with pytest.raises(ValueError, match="'standard' or 'topk'.*'jumprelu'"):
        X.load(out)
    (out / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(ValueError, match="layer_norm"):
        X.load(out)
    folder = X.to_sparsify(_portable("topk"), tmp_path / "s")
    scfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**scfg, "activation": "groupmax"}))
    with pytest.raises(ValueError, match="groupmax"):
        X.load(folder)
    with pytest.raises(ValueError, match="scale must be"):
        X.PortableSAE(_model("relu"), scale=0.0)


# ----------------------------------------------------------------------------- the real libraries


@pytest.fixture(scope="module")
def sae_lens():
    return _lib("sae_lens")


@pytest.fixture(scope="module")
def sparsify():
    return _lib("sparsify")


def _dense(acts, idx, n):
    return torch.zeros(acts.shape[0], n).scatter_(1, idx, acts.float())


@pytest.mark.parametrize("kind", KINDS)
def test_saelens_opens_our_sae(sae_lens, tmp_path, x, kind):
    sae = _portable(kind)
    theirs = sae_lens.SAE.load_from_disk(X.to_saelens(sae, tmp_path / "lens"))
    assert type(theirs).__name__ == ("TopKSAE" if kind == "topk" else "StandardSAE")
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert theirs.cfg.metadata.wsae["gamma"] == (None if sae.gamma is None else sae.gamma.tolist())
    with torch.no_grad():
        _close(theirs(x), sae.reconstruct(x), x)
        lat = theirs.encode(x)
    _close(lat, sae.scale * sae.encode(x), x)
    assert torch.equal(lat > 0, sae.encode(x) > 0)


@pytest.mark.parametrize("kind", KINDS)
def test_sparsify_opens_our_sae(sparsify, tmp_path, x, kind):
    sae = _portable(kind)
    folder = X.to_sparsify(sae, tmp_path / "run")
    theirs = sparsify.Sae.load_from_disk(folder)
    assert set(sparsify.Sae.load_many(str(tmp_path / "run"), local=True)) == {"layers.3"}
    with torch.no_grad():
        out = theirs(x)
    _close(out.sae_out, sae.reconstruct(x), x)
    lat = _dense(out.latent_acts, out.latent_indices, N_M)
    _close(lat, sae.scale * sae.encode(x), x)
    assert torch.equal(lat > 0, sae.encode(x) > 0)


@pytest.mark.parametrize("variant", ["standard", "standard_no_b_dec_in", "topk", "topk_rescaled"])
def test_we_open_a_saelens_sae(sae_lens, tmp_path, x, variant):
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    torch.manual_seed(3)
    common = {"d_in": N_P, "d_sae": N_M, "apply_b_dec_to_input": variant != "standard_no_b_dec_in"}
    if variant.startswith("topk"):
        theirs = TopKSAE(TopKSAEConfig(k=K, rescale_acts_by_decoder_norm=variant == "topk_rescaled", **common))
    else:
        theirs = StandardSAE(StandardSAEConfig(**common))
    with torch.no_grad():
        theirs.b_enc.normal_(0, 0.1)
        theirs.b_dec.normal_(0, 0.3)
        theirs.W_dec.mul_(torch.rand(N_M, 1) + 0.5)  # decoder rows of assorted norms
    theirs.save_model(tmp_path / "lens")
    ours = X.load(tmp_path / "lens")
    assert ours.model.cfg.kind == ("topk" if variant.startswith("topk") else "relu") and ours.scale == 1.0
    with torch.no_grad():
        _close(ours.reconstruct(x), theirs(x), x)
        assert torch.equal(ours.encode(x) > 0, theirs.encode(x) > 0)


def test_we_open_a_sparsify_sae(sparsify, tmp_path, x):
    torch.manual_seed(4)
    theirs = sparsify.Sae(N_P, sparsify.SaeConfig(num_latents=N_M, k=K))
    with torch.no_grad():
        theirs.encoder.bias.normal_(0, 0.1)
        theirs.b_dec.normal_(0, 0.3)
    theirs.save_to_disk(tmp_path / "run" / "layers.5")
    ours = X.load(tmp_path / "run" / "layers.5")
    assert ours.model.cfg.kind == "topk" and ours.model.cfg.k == K and ours.meta["hookpoint"] == "layers.5"
    with torch.no_grad():
        out = theirs(x)
    _close(ours.reconstruct(x), out.sae_out, x)
    _close(ours.encode(x), _dense(out.latent_acts, out.latent_indices, N_M), x)


def test_an_imported_sae_runs_through_splicing_metrics_and_scorers(sae_lens, tmp_path):
    """A SAELens Top-k SAE on a tiny GPT-NeoX's residual stream, imported: the book's splice, FVU
    and the auto-interpretability example selection and scorer all accept it."""
    from sae_lens import TopKSAE, TopKSAEConfig

    from wsae_core import corpus as C
    from wsae_core import interp as I
    from wsae_core import lm as L
    from wsae_core import metrics as M

    docs = C.wiki_documents()
    tiny = L.load_lm(L.make_tiny_gpt_neox(tmp_path / "neox", [d.text for d in docs[:200]], n_layers=2, d_model=32))
    ctx = C.tokenize_contexts(docs, tiny.tokenizer, context_len=24, n_contexts=48, seed=0, source="wiki")
    ids = torch.from_numpy(ctx.tokens)
    acts = L.capture_residuals(tiny, ids, [1])[1].reshape(-1, 32)
    torch.manual_seed(0)
    theirs = TopKSAE(TopKSAEConfig(d_in=32, d_sae=128, k=8))
    with torch.no_grad():
        theirs.b_dec.copy_(acts.mean(0))
    theirs.save_model(tmp_path / "lens")
    ours = X.load(tmp_path / "lens")
    fvu = M.fvu(acts, ours.reconstruct(acts))
    assert np.isfinite(fvu) and fvu > 0
    spliced = L.splice_layers(tiny, ids[:8], {1: {"imported": ours.reconstruct}})[1]["imported"]
    assert np.isfinite(spliced.ce_recovered) and spliced.kl >= 0
    lat = ours.encode(acts).reshape(ids.shape[0], ids.shape[1], -1)
    n_active = (lat > 0).any(1).sum(0)
    j = int((n_active - ids.shape[0] / 2).abs().argmin())  # active in about half the contexts
    cfg = I.SelectionConfig(n_explain_top=2, n_explain_quantile=1, n_score_activating=2, n_score_non_activating=2)
    ex = I.select_examples(ctx.tokens, lat[..., j].numpy(), doc_ids=ctx.doc_ids, config=cfg, latent=j)
    score = I.score_latent(I.KeywordClient(), ex, I.token_strings(tiny.tokenizer))
    assert 0.0 <= score.score <= 1.0 and score.explanation
