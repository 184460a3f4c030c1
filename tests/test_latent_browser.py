"""The latent browser's data generator (wsae_core.browser) on a tiny GPT-NeoX's activation cache,
and the data committed for the book. The page itself: tests/test_latent_browser_page.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsae_core import activations as A
from wsae_core import browser as B
from wsae_core import corpus as C
from wsae_core import interp as I
from wsae_core import lm as L
from wsae_core.interop import PortableSAE
from wsae_core.models import SAEConfig, build_sae

LAYER = 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lb")
    docs = C.wiki_documents()
    tiny = L.load_lm(L.make_tiny_gpt_neox(root / "neox", [d.text for d in docs[:200]], n_layers=2, d_model=32))
    ctx = C.tokenize_contexts(docs, tiny.tokenizer, context_len=32, n_contexts=96, seed=0, source="wiki")
    cache = A.build_activation_cache(tiny, ctx, [LAYER], root=root / "cache")
    x = cache.activations(LAYER, 1)
    saes = {}
    for name, seed in (("SAE", 0), ("WSAE α=1", 1)):
        m = build_sae(SAEConfig(n_p=32, n_m=64, kind="topk", k=4, seed=seed)).eval()
        with torch.no_grad():
            m.b_dec.copy_(x.mean(0))
        saes[name] = PortableSAE(m, scale=2.0, meta={"method": name, "alpha": float(seed)})
    return tiny, cache, saes


@pytest.fixture(scope="module")
def data(setup):
    tiny, cache, saes = setup
    stats = B.latent_codes(saes["SAE"], cache.activations(LAYER, 1), cache.doc_ids[:, 1:].reshape(-1))
    eligible = np.flatnonzero(stats[1] >= B.BROWSER_SELECTION.n_activating_needed)
    explained, other = int(eligible[-1]), int(eligible[-2])
    expl = {"records": [{"kind": "sae", "layer": LAYER, "method": "SAE", "latent": explained,
                         "explanation": "mentions of </script> in film titles", "score": 0.75,
                         "detection": 0.8, "fuzzing": 0.7, "detection_auc": float("nan")},
                        # written for other weights: the run saw this latent fire in other documents
                        {"kind": "sae", "layer": LAYER, "method": "SAE", "latent": other,
                         "explanation": "something else", "n_activating": 10**6}]}
    d = B.build_latent_browser(saes, cache, LAYER, I.token_strings(tiny.tokenizer), explanations=expl,
                               n_latents=3, progress=False, description="a tiny random GPT-NeoX")
    d["_explained"], d["_other"] = explained, other
    return d


def test_sampled_latents_explained_ones_first_and_paired(data):
    by_sae = [[l for l in data["latents"] if l["sae"] == s] for s in (0, 1)]
    first = {l["id"]: l for l in by_sae[0][:2]}  # the latents with explanations come first
    assert set(first) == {data["_explained"], data["_other"]}
    hit = first[data["_explained"]]
    assert hit["explanation"].startswith("mentions of") and hit["score"] == 0.75
    assert "detection_auc" not in hit  # NaN scores are dropped, not written as NaN
    assert "explanation" not in first[data["_other"]] and first[data["_other"]]["explanation_withheld"]
    assert data["saes"][0]["explanations_not_matching"] == 1
    assert 1 <= len(by_sae[0]) <= 5 + 5  # 2 explained, 3 sampled, paired with the WSAE's
    ids1 = {l["id"] for l in by_sae[1]}
    for l in by_sae[0][:5]:  # each sampled SAE latent's nearest eligible WSAE latent is in the sample
        assert any(i in ids1 for i, _ in l["neighbours"]["1"])


def test_contexts_histogram_and_neighbours_are_consistent(data):
    n_tokens = data["n_tokens"]
    for l in data["latents"]:
        peaks = [max(c["a"]) for c in l["top"]]
        assert peaks[0] == 100 and peaks == sorted(peaks, reverse=True)
        assert all(max(c["a"]) <= 100 for c in l["quantiles"]) and len(l["quantiles"]) <= 4
        for c in l["top"] + l["quantiles"]:
            assert len(c["t"]) == len(c["a"]) <= 12 + 1 + 4 and all(0 <= t < len(data["tokens"]) for t in c["t"])
        assert abs(sum(l["hist"]) / n_tokens - l["frequency"]) <= 1e-3 * l["frequency"] + 1e-9
        assert l["n_docs"] >= B.BROWSER_SELECTION.n_activating_needed and l["max"] > 0
        for other, pairs in l["neighbours"].items():
            cos = [c for _, c in pairs]
            assert int(other) != l["sae"] and len(pairs) == 5
            assert cos == sorted(cos, reverse=True) and all(-1.001 <= c <= 1.001 for c in cos)


def test_nearest_latents_of_a_copy_is_itself(setup):
    _, _, saes = setup
    idx, cos = B.nearest_latents(saes["SAE"], saes["SAE"], [0, 5, 9], k=2)
    assert idx[:, 0].tolist() == [0, 5, 9] and np.allclose(cos[:, 0], 1.0, atol=1e-5)


def test_written_file_is_a_script_and_reads_back(data, tmp_path):
    path = B.write_latent_browser(data, tmp_path / "data.js")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("window.WSAE_LATENT_BROWSER = {") and "</script>" not in text
    assert B.read_latent_browser(path) == data


def test_bad_inputs_are_named(setup):
    tiny, cache, saes = setup
    wide = PortableSAE(build_sae(SAEConfig(n_p=16, n_m=32, kind="topk", k=2)))
    with pytest.raises(ValueError, match="d_model = 32"):
        B.build_latent_browser({"x": wide}, cache, LAYER, I.token_strings(tiny.tokenizer))
    with pytest.raises(ValueError, match="at least one SAE"):
        B.build_latent_browser({}, cache, LAYER, [])


def test_committed_data_is_small_and_complete():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "book" / "browser_assets" / "latent_browser" / "data.js"
    assert path.stat().st_size < 400_000, f"{path} is {path.stat().st_size:,} bytes; keep it a few hundred KB"
    d = B.read_latent_browser(path)
    assert [s["name"] for s in d["saes"]] == ["SAE", "WSAE α=0.5", "WSAE α=1"]
    assert {l["sae"] for l in d["latents"]} == {0, 1, 2}
    assert sum(bool(l.get("explanation")) for l in d["latents"]) >= 3
