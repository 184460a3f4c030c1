"""The latent browser's data generator (wsae_core.browser) on a tiny GPT-NeoX's activation cache,
and the data committed for the book. The page itself: tests/test_latent_browser_page.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

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


def _n_activating(setup, name, latent, selection):
    """Documents latent ``latent`` of SAE ``name`` fires in, as a scoring run on these weights counts them."""
    _, cache, saes = setup
    x = cache.activations(LAYER, 1)
    with torch.no_grad():
        col = saes[name].model.encode(x / saes[name].scale)[:, latent].numpy()
    acts = np.zeros(cache.tokens.shape, dtype=np.float32)
    acts[:, 1:] = col.reshape(len(acts), -1)
    return I.select_examples(cache.tokens, acts, doc_ids=cache.doc_ids, config=selection, latent=latent).n_activating


def test_scores_format_attaches_aurocs_of_the_shown_seed(setup):
    tiny, cache, saes = setup
    selection = I.SelectionConfig(n_explain_top=4, n_explain_quantile=2, n_score_activating=1, n_score_non_activating=1)
    stats = B.latent_codes(saes["SAE"], cache.activations(LAYER, 1), cache.doc_ids[:, 1:].reshape(-1))
    eligible = np.flatnonzero(stats[1] >= selection.n_activating_needed)
    good, stale, seed1 = (int(j) for j in eligible[-3:])

    def rec(latent, seed, n_activating, **kw):
        return {"label": "SAE", "layer": LAYER, "rule": "uniform", "alpha": 0.0, "seed": seed, "latent": latent,
                "n_activating": n_activating, "seconds_baseline": 3.5, **kw}

    scores = {"spec": {"explainers": ["baseline"], "scorers": ["embedding", "surprisal"],
                       "selection": dataclasses.asdict(selection)},
              "records": [rec(good, 0, _n_activating(setup, "SAE", good, selection),
                              explanation_baseline='words such as "film"', embedding_baseline=0.703125,
                              surprisal_baseline=float("nan")),
                          rec(stale, 0, 10**6, explanation_baseline="other weights", embedding_baseline=0.9),
                          rec(seed1, 1, 1, explanation_baseline="seed 1's SAE", embedding_baseline=0.6),
                          {**rec(good, 0, 1, explanation_baseline="a control", embedding_baseline=0.5),
                           "label": "untrained SAE (control)"}]}
    table = B.explanations_by_latent(scores, LAYER, seed=0)
    assert set(table) == {("SAE", good), ("SAE", stale), ("untrained SAE (control)", good)}
    assert set(B.explanations_by_latent(scores, LAYER)) == set(table) | {("SAE", seed1)}  # no seed: every record
    assert B.explanations_by_latent(scores, LAYER + 1, seed=0) == {}
    d = B.build_latent_browser(saes, cache, LAYER, I.token_strings(tiny.tokenizer), explanations=scores, sae_seed=0,
                               n_latents=2, progress=False)
    assert d["sae_seed"] == 0 and (d["selection"]["top"], d["selection"]["quantiles"]) == (4, 2)  # the run's windows
    sae0 = {l["id"]: l for l in d["latents"] if l["sae"] == 0}
    assert sae0[good]["explanation"] == 'words such as "film"' and sae0[good]["explainer"] == "baseline"
    # NaN AUROCs and timings are not scores
    assert sae0[good]["scores"] == [{"scorer": "embedding", "explainer": "baseline", "auroc": 0.7031}]
    assert sae0[stale]["explanation_withheld"] and "explanation" not in sae0[stale] and "scores" not in sae0[stale]
    assert d["saes"][0]["explanations_not_matching"] == 1
    assert all(l.get("explanation") != "seed 1's SAE" for l in d["latents"])
    assert not any("explanation" in l for l in d["latents"] if l["sae"] == 1)  # the control's records name no SAE shown


def test_several_explainers_keep_every_explanation():
    r = {"label": "SAE", "layer": 3, "seed": 0, "latent": 7, "n_activating": 40, "explanation_smollm2": "years",
         "explanation_baseline": "words such as \"1990\"", "embedding_smollm2": 0.8, "embedding_baseline": 0.6,
         "surprisal_baseline": 0.55, "seconds_smollm2": 9.0}
    e = B.explanations_by_latent({"spec": {"explainers": ["baseline", "smollm2"]}, "records": [r]}, 3, seed=0)[("SAE", 7)]
    assert (e["explainer"], e["explanation"]) == ("baseline", r["explanation_baseline"])
    assert e["explanations"] == {"smollm2": "years"}
    assert {(s["scorer"], s["explainer"], s["auroc"]) for s in e["scores"]} == {
        ("embedding", "baseline", 0.6), ("surprisal", "baseline", 0.55), ("embedding", "smollm2", 0.8)}
    assert e["n_activating"] == 40


def test_sae_seed_and_pairing_errors_are_named(setup):
    tiny, cache, saes = setup
    other = PortableSAE(saes["SAE"].model, scale=2.0, meta={"method": "SAE", "seed": 1})
    with pytest.raises(ValueError, match=r"sae_seed is 0 .*\{'SAE': 1\}"):
        B.build_latent_browser({"SAE": other}, cache, LAYER, I.token_strings(tiny.tokenizer), sae_seed=0)
    with pytest.raises(ValueError, match="paired names SAEs that are not given: \\['nope'\\]"):
        B.build_latent_browser(saes, cache, LAYER, I.token_strings(tiny.tokenizer), paired=["nope"])


def _fake_sweep(tmp_path):
    recs = []
    for layer in (3, 9):
        for seed in (0, 1):
            for method, rule, alpha in (("SAE", "uniform", 0.0), ("WSAE α=1", "variance", 1.0),
                                        ("WSAE learned oracle", "learned_oracle", None),
                                        ("untrained SAE (control)", "untrained", None)):
                folder = tmp_path / f"L{layer}-{rule}-{alpha}-s{seed}"
                folder.mkdir()
                recs.append({"layer": layer, "seed": seed, "method": method, "rule": rule, "alpha": alpha,
                             "sae_dir": str(folder)})
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"records": recs}))
    return path


def test_cli_takes_every_trained_rule_of_the_chosen_seed(tmp_path):
    from wsae_core.__main__ import _sweep

    path = _fake_sweep(tmp_path)
    _, recs = _sweep(path, "ci", 9, 1)
    assert [(r["method"], r["layer"], r["seed"]) for r in recs] == [
        ("SAE", 9, 1), ("WSAE α=1", 9, 1), ("WSAE learned oracle", 9, 1)]  # the control was never trained
    assert len(_sweep(path, "ci")[1]) == 12
    with pytest.raises(SystemExit, match=r"no trained SAE of seed 2 at layer 3; seeds: \[0, 1\]"):
        _sweep(path, "ci", 3, 2)
    with pytest.raises(SystemExit, match=r"no trained SAE at layer 4; layers: \[3, 9\]"):
        _sweep(path, "ci", 4, 0)


def test_committed_data_is_small_and_complete():
    root = Path(__file__).resolve().parents[1]
    path = root / "book" / "browser_assets" / "latent_browser" / "data.js"
    assert path.stat().st_size < 400_000, f"{path} is {path.stat().st_size:,} bytes; keep it a few hundred KB"
    d = B.read_latent_browser(path)
    sweep = json.loads((root / "book" / "results" / "lm_sweep_book.json").read_text())
    assert [s["name"] for s in d["saes"]] == sweep["spec"]["methods"] and d["sae_seed"] == 0
    assert {l["sae"] for l in d["latents"]} == set(range(len(d["saes"])))
    scored = [l for l in d["latents"] if any(s["scorer"] == "embedding" for s in l.get("scores", []))]
    assert len({l["sae"] for l in scored}) == len(d["saes"]) and all(l["explanation"] for l in scored)
    assert all(0 <= s["auroc"] <= 1 for l in scored for s in l["scores"])
