"""Auto-interpretability (wsae_core.interp) at its edges, against values worked out by hand: the
selection's boundaries and dtypes, the judge's renormalised probabilities, the cache's file format
and keys, the reply parser's cuts, the keyword judge's exact replies, the baseline explainer's
rules at their thresholds, and the surprisal scorer's bookkeeping.

Each test pins a documented behaviour that a one-token change to the code would alter (they were
written against the surviving mutants of ``make mutation MUTATE=interp``; see CONTRIBUTING.md)."""

import hashlib
import json
import math
import warnings

import numpy as np
import pytest

from test_interp import Recorder  # the keyword judge, recording its prompts
from wsae_core import interp as I

VOCAB = ["<eos>", " the", " cat", " sat", " on", " mat", " dog", " ran", ".", " a", " big", " red", " fox", " silent"]


def _ex(ids, acts, context=0, start=0, marked=None):
    a = np.asarray(acts, dtype=np.float32)
    return I.Example(context, start, np.asarray(ids, dtype=np.int64), a, a > 0 if marked is None else np.asarray(marked))


def _latent(n_ctx=40, T=12, seed=0):
    """A latent firing on one random token of each of the first half of the contexts."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, len(VOCAB), size=(n_ctx, T))
    acts = np.zeros((n_ctx, T), np.float32)
    for c in range(n_ctx // 2):
        acts[c, rng.integers(T)] = 0.5 + rng.random()
    return tokens, acts


SMALL = I.SelectionConfig(n_explain_top=2, n_explain_quantile=2, n_score_activating=3, n_score_non_activating=3,
                          window_before=4, window_after=2)


# ----------------------------------------------------------------------------- selection


def test_selection_computes_in_float32_and_marks_strictly_above_the_threshold():
    """Activations are read as float32 whatever their dtype (the reported maximum is the float32
    value), and a token is marked only when its activation *exceeds* ``mark_threshold`` x the maximum."""
    tokens, acts = _latent()
    acts64 = acts.astype(np.float64)
    acts64[acts64 > 0] += 0.1  # values that float32 cannot hold exactly
    ex = I.select_examples(tokens, acts64, config=SMALL, latent=0)
    top = float(acts64.max())
    assert ex.max_activation == float(np.float32(top)) != top
    assert all(e.activations.dtype == np.float32 for e in ex.explain + ex.activating + ex.non_activating)
    # a token at exactly 0.5 x the maximum is not marked; one just above is
    a = acts.copy()
    c = int(np.flatnonzero(a.max(1) > 0)[0])
    p = int(a[c].argmax())
    a[c] = 0.0
    a[c, p] = 2.0
    a[c, (p + 1) % a.shape[1]] = 1.0  # exactly half
    a[c, (p + 2) % a.shape[1]] = np.nextafter(np.float32(1.0), np.float32(2.0))
    a[a > 2.0] = 1.5  # make context c the strongest
    half = I.SelectionConfig(**{**SMALL.__dict__, "mark_threshold": 0.5})
    ex = I.select_examples(tokens, a, config=half, latent=0)
    first = ex.explain[0]
    assert first.context == c
    marked = {int(first.start + i) for i in np.flatnonzero(first.marked)}
    want = {p} | ({(p + 2) % a.shape[1]} if first.start <= (p + 2) % a.shape[1] < first.start + first.marked.size else set())
    assert marked == want


def test_selection_orders_tied_peaks_by_context_and_keeps_the_held_out_contexts_apart():
    """Contexts whose peaks tie are taken in context order (a stable sort), and no held-out
    activating context is also an explanation context, for any seed."""
    T = 8
    tokens = np.tile(np.arange(1, T + 1) % len(VOCAB), (120, 1))
    acts = np.zeros((120, T), np.float32)
    acts[:100, 3] = np.random.default_rng(0).integers(1, 3, size=100)  # 100 contexts, peaks 1 or 2
    cfg = I.SelectionConfig(**{**SMALL.__dict__, "n_explain_top": 10})
    ex = I.select_examples(tokens, acts, config=cfg, latent=0)
    assert [e.context for e in ex.explain[:10]] == np.flatnonzero(acts[:, 3] == 2)[:10].tolist()
    for seed in range(6):
        cfg = I.SelectionConfig(**{**SMALL.__dict__, "seed": seed, "n_explain_quantile": 20, "n_score_activating": 20})
        tokens, acts = _latent(n_ctx=200, seed=seed)
        ex = I.select_examples(tokens, acts, config=cfg, latent=seed)
        explain = {e.context for e in ex.explain}
        held = [e.context for e in ex.activating]
        assert len(held) == len(set(held)) == 20 and not explain & set(held), seed


def test_selection_with_exactly_enough_silent_documents():
    """Per-document negatives need ``n_score_non_activating`` silent documents, and exactly that
    many suffice; in contexts shorter than ``window_before`` the negative windows start at 0."""
    T = 10
    n_docs = 8
    tokens = np.tile(np.arange(1, T + 1), (n_docs, 1))
    acts = np.zeros((n_docs, T), np.float32)
    acts[:5, 2] = 1.0 + np.arange(5)  # 5 active documents, 3 silent ones
    docs = np.repeat(np.arange(n_docs)[:, None], T, axis=1)
    cfg = I.SelectionConfig(n_explain_top=2, n_explain_quantile=1, n_score_activating=2, n_score_non_activating=3,
                            window_before=3, window_after=1, negatives_per_document=True)
    ex = I.select_examples(tokens, acts, doc_ids=docs, config=cfg, latent=0)
    assert sorted(e.context for e in ex.non_activating) == [5, 6, 7]
    short = I.SelectionConfig(**{**cfg.__dict__, "window_before": T})  # every context is shorter
    ex = I.select_examples(tokens, acts, doc_ids=docs, config=short, latent=0)
    assert [e.start for e in ex.non_activating] == [0, 0, 0]
    centres = I._negative_centres(np.arange(3), tokens.shape, short, np.random.default_rng(0))
    assert centres.dtype.kind == "i" and centres.tolist() == [0, 0, 0]


def test_random_marking_uses_every_free_token_when_there_are_just_enough():
    ex = _ex([1, 2, 3, 4], [1, 1, 0, 0])
    fake = I.random_marking(ex, np.random.default_rng(0))
    assert fake.tolist() == [False, False, True, True]
    assert I.random_marking(_ex([1, 2, 3], [1, 1, 0]), np.random.default_rng(0)) is None


# ----------------------------------------------------------------------------- metrics and the judge


def test_roc_auc_reads_scores_as_float64_and_checks_its_shapes():
    assert I.roc_auc([1, 0], [True, False]) == 1.0  # booleans are numbers, not a subtraction error
    with pytest.raises(ValueError, match="NaN"):
        I.roc_auc([1, 0], [None, 0.5])  # a missing score is a NaN, refused
    with pytest.raises(ValueError, match="1-D of equal length"):
        I.roc_auc([[1, 0]], [[0.5, 0.2]])


class Fixed(I.ChatClient):
    """Option log-probabilities given per prompt; ``None`` ones fall back to text replies."""

    identity = "fixed"

    def __init__(self, lps, replies=()):
        self.lps, self.replies, self.chats = list(lps), list(replies), []

    def chat(self, messages, *, max_tokens=48):
        self.chats.append((messages, max_tokens))
        return self.replies.pop(0)

    def score_options(self, prompts, options):
        return self.lps[: len(prompts)]


def test_judge_renormalises_the_option_probabilities_and_rounds_to_six_decimals():
    """P(Yes) = p(Yes) / (p(Yes) + p(No)) from log-probabilities that need not sum to one, kept to 6
    decimals; exactly 1/2 is a No; prompts without probabilities are asked as text, with 8 tokens."""
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    lps = [[math.log(0.3), math.log(0.1)], [0.0, math.log(2.0)], [math.log(0.2), math.log(0.2)], None]
    client = Fixed(lps, replies=["No."])
    res = I._judge(client, prompts, [1, 0, 1, 0])
    assert res.p_yes == [0.75, 0.333333, 0.5, None]
    assert res.pred == [1, 0, 0, 0]
    assert client.chats == [(prompts[3], 8)]
    assert res.balanced_accuracy == 0.75 and math.isnan(res.auc)
    full = I._judge(Fixed(lps[:3]), prompts[:3], [1, 0, 1])
    assert full.p_yes == [0.75, 0.333333, 0.5] and full.auc == I.roc_auc([1, 0, 1], [0.75, 0.333333, 0.5])


# ----------------------------------------------------------------------------- the response cache


def test_cache_keys_hash_ascii_json_and_file_names_are_slugs():
    obj = ["fake:keyword", "chat", {"messages": [{"role": "user", "content": "café"}]}]
    text = json.dumps(obj, sort_keys=True, ensure_ascii=True)
    assert "\\u00e9" in text and I._key(obj) == hashlib.sha256(text.encode()).hexdigest()[:24]
    assert I._slug("SmolLM2-135M/Instruct") == "SmolLM2-135M_Instruct"
    assert I._slug(":: X:a ::") == "X_a"
    assert I._slug("  spaced out  ") == "spaced_out"
    assert I._slug("a" * 100) == "a" * 80
    assert I._slug("::") == I._slug("") == "client"


def test_jsonl_store_format_counts_and_damaged_lines(tmp_path):
    """One sorted-key JSON object per line, UTF-8 kept as is; folders made as needed; a damaged
    line is skipped, not the end of the file; every hit is counted."""
    path = tmp_path / "a" / "b" / "s.jsonl"
    store = I.JsonlStore(path)
    request = {"messages": [{"role": "user", "content": "café"}], "max_tokens": 3}
    store.put("k1", "chat", request, "Oui")
    line = path.read_text(encoding="utf-8").splitlines()[0]
    assert line == json.dumps({"key": "k1", "kind": "chat", "request": request, "response": "Oui"},
                              ensure_ascii=False, sort_keys=True)
    assert "café" in line and line.index('"content"') < line.index('"role"')
    with path.open("a", encoding="utf-8") as f:
        f.write("{not json\n")
        f.write(json.dumps({"key": "k2", "kind": "chat", "request": None, "response": "Non"}) + "\n")
        f.write('{"kind": "chat"}\n')  # no key
        f.write(json.dumps({"key": "k3", "kind": "chat", "request": None, "response": "Si"}) + "\n")
    fresh = I.JsonlStore(path)
    assert fresh.entries() == {"k1": "Oui", "k2": "Non", "k3": "Si"}
    assert [fresh.get("k1"), fresh.get("k2"), fresh.get("nope")] == ["Oui", "Non", None]
    assert fresh.hits == 2


def test_scorer_store_and_cached_client_folders(tmp_path, monkeypatch):
    monkeypatch.setenv(I.CACHE_ENV, str(tmp_path / "env"))
    s = I.scorer_store("surprisal:m/x")
    assert s.path == tmp_path / "env" / "surprisal_m_x.jsonl" and s.allow_miss is True
    s = I.scorer_store("surprisal:m/x", tmp_path / "given", allow_miss=False)
    assert s.path == tmp_path / "given" / "surprisal_m_x.jsonl" and s.allow_miss is False
    c = I.CachedClient(I.KeywordClient())
    assert c.path == tmp_path / "env" / "fake_keyword.jsonl"


def test_token_strings_decode_each_id_without_cleaning_spaces():
    class Tok:
        def __len__(self):
            return 3

        clean_up_tokenization_spaces = True  # the tokenizer's default, used when the call says None

        def batch_decode(self, ids, clean_up_tokenization_spaces=None):
            clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
            text = {0: " ,", 1: " n't", 2: " cat"}
            return [text[i[0]].replace(" ,", ",").replace(" n't", "n't") if clean else text[i[0]]
                    for i in ids]

    assert I.token_strings(Tok()) == [" ,", " n't", " cat"]


# ----------------------------------------------------------------------------- the reply parser


@pytest.mark.parametrize("reply, want", [
    ("**X-rays**", "X-rays"),
    ("`code words`", "code words"),
    ('""', "(no explanation)"),
    ("''", "(no explanation)"),
    ("XboxX", "XboxX"),
    ("Answer: Feature: the feature is dogs", "the feature is dogs"),  # two stacked prefixes are removed, not three
])
def test_parse_explanation_strips_markup_quotes_and_prefixes(reply, want):
    assert I.parse_explanation(reply) == want


def test_parse_explanation_cuts_long_lines_at_a_space():
    exact = "w" * 160
    assert I.parse_explanation(exact) == exact
    words = " ".join(["word"] * 40)  # 199 characters
    assert I.parse_explanation(words) == " ".join(["word"] * 32) + "..."  # 32 x 5 - 1 = 159 <= 160
    tabbed = "a" * 150 + " bbbb\tcccc ddd"
    assert I.parse_explanation(tabbed) == "a" * 150 + "..."
    assert I.parse_explanation("v" * 161) == "v" * 160 + "..."


# ----------------------------------------------------------------------------- the keyword judge


def test_keyword_client_replies_exactly():
    kc = I.KeywordClient()
    # the two most frequent marked words, ties in alphabetical order
    ex = [_ex([9, 2], [0, 1]), _ex([1, 2], [0, 1]), _ex([6, 3], [1, 0]), _ex([12, 7], [1, 0])]
    assert kc.chat(I.explainer_messages(ex, VOCAB)) == 'Explanation: the words "cat", "dog"'
    assert kc.chat(I.explainer_messages([_ex([1, 2], [0, 0])], VOCAB)) == "Explanation: nothing"
    many = [_ex([i % 12 + 1], [1]) for i in range(12)] + [_ex([13], [1])] * 3
    assert kc.chat(I.explainer_messages(many, VOCAB)) == 'Explanation: the words "silent", "."'  # ties: in sorted order
    assert kc.chat(I.detection_messages('the words "cat"', "the cat sat")) == "Yes"
    assert kc.chat(I.detection_messages('the words "cat"', "the dog sat")) == "No"
    assert kc.chat(I.detection_messages('the words "cat"', "the dog\nand the cat")) == "Yes"  # over lines
    assert kc.chat([{"role": "user", "content": "How are you?"}]) == "No"  # not a judge prompt
    assert kc.n_calls == 7


def test_keyword_client_breaks_ties_among_many_words_alphabetically():
    words = [f" w{i:03d}" for i in range(400)]
    kc = I.KeywordClient()
    for seed in range(5):
        twice = np.random.default_rng(seed).random(400) < 0.5  # words marked twice or once
        ex = [_ex([i], [1]) for i in range(400)] + [_ex([i], [1]) for i in np.flatnonzero(twice)]
        best = [words[i].strip() for i in np.flatnonzero(twice)[:2]]
        assert kc.chat(I.explainer_messages(ex, words)) == f'Explanation: the words "{best[0]}", "{best[1]}"', seed


# ----------------------------------------------------------------------------- score_latents


def test_score_latents_reads_the_documents_and_the_seed():
    """One context per document when ``doc_ids`` are given (a latent active in many contexts of one
    document is skipped); fuzzing draws its random marks with the configuration's seed."""
    tokens, acts = _latent(n_ctx=60, seed=3)
    docs = np.repeat(np.arange(60)[:, None], tokens.shape[1], axis=1)
    one_doc = docs.copy()
    one_doc[:30] = 0
    cfg = I.SelectionConfig(**{**SMALL.__dict__, "seed": 4})
    got = I.score_latents(I.KeywordClient(), tokens, lambda _: acts, [0], VOCAB, doc_ids=docs, config=cfg)
    assert len(got) == 1
    assert I.score_latents(I.KeywordClient(), tokens, lambda _: acts, [0], VOCAB, doc_ids=one_doc, config=cfg) == []
    ex = I.select_examples(tokens, acts, doc_ids=docs, config=cfg, latent=0)
    expl = got[0].explanation

    def fuzz_prompts(run):
        rec = Recorder()
        run(rec)
        return [p for p in rec.prompts if "Are the marked tokens" in p[-1]["content"]]

    seeded = fuzz_prompts(lambda c: I.fuzzing(c, expl, ex, VOCAB, seed=4))
    assert seeded != fuzz_prompts(lambda c: I.fuzzing(c, expl, ex, VOCAB, seed=0))
    assert fuzz_prompts(lambda c: I.score_latents(c, tokens, lambda _: acts, [0], VOCAB, doc_ids=docs, config=cfg)) == seeded
    assert fuzz_prompts(lambda c: I.score_latent(c, ex, VOCAB, seed=4)) == seeded
    assert fuzz_prompts(lambda c: I.score_latent(c, ex, VOCAB)) == fuzz_prompts(lambda c: I.fuzzing(c, expl, ex, VOCAB, seed=0))
    # detection shows its excerpts unmarked
    rec = Recorder()
    I.detection(rec, expl, ex, VOCAB)
    assert len(rec.prompts) == len(ex.activating) + len(ex.non_activating)
    assert not any(I.MARK_OPEN in p[-1]["content"] for p in rec.prompts)


# ----------------------------------------------------------------------------- the baseline explainer


def test_baseline_explainer_defaults_and_background_over_the_whole_vocabulary():
    vocab = VOCAB + [" unused", " never"]
    tokens = np.tile(np.arange(1, 14), (4, 1))
    bx = I.BaselineExplainer(tokens, vocab)
    assert (bx.max_tokens, bx.min_lift, bx.topic_share, bx.topic_lift) == (5, 10.0, 0.5, 2.0)
    counts = np.bincount(tokens.ravel(), minlength=len(vocab))
    np.testing.assert_allclose(bx.background, (counts + 0.5) / (counts.sum() + 0.5 * len(vocab)), rtol=1e-15)
    labels = np.zeros_like(tokens)
    lb = I.BaselineExplainer(tokens, vocab, labels=labels, label_names=["a", "b", "c"])
    assert lb.label_rate.tolist() == [1.0, 0.0, 0.0]
    labels[0, :6] = 1  # label 1 holds six token types only: log 0 for the others
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unused tokens (0 / 0, log 0) raise no warning
        I.BaselineExplainer(tokens, vocab, labels=labels, label_names=["a", "b", "c"])


def test_baseline_explainer_topic_words_rule():
    """Topic words: word-initial, alphabetic, at least 4 letters (" silent" and " word" count,
    " 1abc" does not), at least 5 occurrences in the topic, more than expected, any positive G."""
    vocab = ["<eos>", " the", " word", " silent", " 1abc", " rare", " mild", " cat"]
    # topic 1 (one row of 40): " word" x5, " 1abc" x8, " silent" x6, " rare" x4 (too few), " mild" x7
    topic = [2] * 5 + [4] * 8 + [3] * 6 + [5] * 4 + [6] * 7 + [1] * 10
    # topic 0 (five rows): " mild" 34 times in 200 tokens, so that topic 1's 7 in 40 is barely enriched
    other = [[6] * n + [1] * (40 - n) for n in (7, 7, 7, 7, 6)]
    tokens = np.array([topic, *other])
    labels = np.array([[1] * 40] + [[0] * 40] * 5)
    bx = I.BaselineExplainer(tokens, vocab, labels=labels, label_names=["other", "topic"], max_tokens=10)
    flat, labs = tokens.ravel(), labels.ravel()
    counts = np.bincount(flat, minlength=len(vocab)).astype(float)
    occ = np.bincount(flat[labs == 1], minlength=len(vocab)).astype(float)
    expected = occ.sum() * counts / counts.sum()
    g = {t: 2 * occ[t] * math.log(occ[t] / expected[t]) for t in (2, 3, 6)}
    assert 0 < g[6] < 1  # " mild": 7 of 40 against 41 of 240
    assert bx.topic_words["topic"] == sorted(g, key=lambda t: -g[t])
    assert bx.topic_words["other"] == []


def test_baseline_explainer_ranks_and_filters_at_the_thresholds():
    """``good`` = marked in >= 2 excerpts and lift >= min_lift (a lift exactly at min_lift counts);
    within a group, higher G first."""
    rng = np.random.default_rng(5)
    tokens = rng.integers(1, len(VOCAB), size=(50, 10))
    bx = I.BaselineExplainer(tokens, VOCAB, min_lift=1.0)
    # " fox" (12) in 3 excerpts, " red" (11) in 2, " big" (10) in 1 (three times in its window, once
    # marked: a higher G than " red"'s); none in half of the 8 excerpts
    ex = [_ex([12, 1], [1, 0], context=0), _ex([12, 1], [1, 0], context=1), _ex([12, 1], [1, 0], context=2),
          _ex([11, 1], [1, 0], context=3), _ex([11, 1], [1, 0], context=4), _ex([10, 10, 10], [1, 0, 0], context=5),
          _ex([1, 1], [0, 0], context=6), _ex([1, 8], [0, 0], context=7)]
    ranked = bx.ranked_tokens(ex)
    assert [r[:2] for r in ranked] == [(12, 3), (11, 2), (10, 1)]
    red, big = ranked[1], ranked[2]
    assert ranked[0][2] > red[2] and big[2] > red[2] and big[2] >= 2 and big[3] >= 1.0
    assert bx(ex) == 'words such as "fox", "red"'  # " big" is marked in one excerpt only
    # a lift exactly at the threshold counts as enriched: " red" still ranks before " big"
    at = I.BaselineExplainer(tokens, VOCAB, min_lift=red[3])
    assert [r[0] for r in at.ranked_tokens(ex)] == [12, 11, 10] and at(ex) == 'words such as "fox", "red"'
    above = I.BaselineExplainer(tokens, VOCAB, min_lift=np.nextafter(red[3], np.inf))
    assert [r[0] for r in above.ranked_tokens(ex)] == [12, 10, 11] and above(ex) == 'words such as "fox"'
    # among the not-enriched ones, higher G first too
    never = I.BaselineExplainer(tokens, VOCAB, min_lift=1e9).ranked_tokens(ex)
    assert [r[2] for r in never] == sorted((r[2] for r in never), reverse=True)


def test_baseline_explainer_topic_at_its_exact_thresholds():
    """A topic holding exactly ``topic_share`` of the excerpts, at exactly ``topic_lift`` x its
    corpus rate, is named; the label is read at the strongest token, ``start`` + its position."""
    tokens = np.ones((4, 8), int)
    names = ["other", "topic", "third"]
    labels = np.array([[1] * 8, [0] * 8, [0] * 8, [2] * 8])  # "topic": a quarter of the corpus
    eq = I.BaselineExplainer(tokens, VOCAB, labels=labels, label_names=names, topic_lift=2.0)
    assert eq.label_rate.tolist() == [0.5, 0.25, 0.25]
    at = lambda c, start=0: _ex([1, 1, 1], [0.1, 1.0, 0.2], context=c, start=start)  # noqa: E731
    assert eq.topic([at(0), at(0), at(2), at(3)]) == "topic"  # share 0.5 = topic_share = 2 x 0.25
    lab = labels.copy()
    lab[1, 5] = 1  # one token of context 1, at position 5
    bx = I.BaselineExplainer(tokens, VOCAB, labels=lab, label_names=names)
    # strongest token at position 1 of a window starting at 4: the label at (1, 5), not (1, 4) or (1, 3)
    assert bx.topic([at(1, start=4), at(1, start=4)]) == "topic"
    assert bx.topic([at(1, start=3), at(1, start=3)]) == "other"


def test_baseline_explainer_exact_texts():
    """The explanation strings in full: word lists joined by ", ", JSON-quoted words with non-ASCII
    kept and whitespace-only tokens quoted raw, bigrams with their spaces collapsed; a latent given
    as ``LatentExamples`` is explained from its explanation contexts."""
    vocab = ["<eos>", " the", " café", "\n", " cat", " sat", "  big\n", " red", " fox", " on"]
    tokens = np.tile(np.arange(1, 10), (20, 1))
    bx = I.BaselineExplainer(tokens, vocab, min_lift=0.0, max_tokens=3)
    assert bx._word(2) == '"café"' and bx._word(3) == '"\\n"'
    token = [_ex([6, 2], [0, 1], context=0), _ex([6, 2], [0, 1], context=1), _ex([1, 5], [0, 0], context=2)]
    assert bx(token) == 'the word "café" (as in "big café")'
    latent = I.LatentExamples(0, 1.0, 3, token, [], [])
    assert bx(latent) == bx(token)
    # a marked token at position 0 has no predecessor (not the window's last token)
    first = [_ex([4, 7], [1, 0], context=c) for c in range(2)] + [_ex([1, 5], [0, 0], context=2)]
    assert bx(first) == 'the word "cat"'
    # other marked tokens do not make pairs with their own predecessors
    spread = [_ex([7, 4, 8], [0, 1, 1], context=0), _ex([9, 4, 8], [0, 1, 1], context=1),
              _ex([1, 5], [0, 0], context=2), _ex([1, 5], [0, 0], context=3), _ex([1, 5], [0, 0], context=4)]
    assert bx(spread).startswith("words such as ")
    assert bx(spread) == f"words such as {bx._word(bx.ranked_tokens(spread)[0][0])}, {bx._word(bx.ranked_tokens(spread)[1][0])}"
    assert bx._bigram(spread, 4) is None and bx._bigram(spread, 8) == '"cat fox"'


def test_baseline_explainer_topic_texts():
    tokens = np.tile(np.arange(1, 14), (8, 1))
    labels = np.zeros_like(tokens)
    labels[:2] = 1
    names = ["other", "topic"]
    ex = [_ex([t, 1], [1, 0], context=c) for c, t in zip((0, 1, 0, 1, 5), (2, 6, 2, 6, 12))]
    v6 = I.BaselineExplainer(tokens, VOCAB, labels=labels, label_names=names, min_lift=1.0, corpus_topic_words=False)
    assert v6(ex) == 'text about topic, with words such as "cat", "dog"'
    v7 = I.BaselineExplainer(tokens, VOCAB, labels=labels, label_names=names, min_lift=1.0)
    assert v7.topic_words["topic"] == []  # no word has 5 occurrences in the topic
    assert v7(ex) == "text about topic"
    v7.topic_words["topic"] = [6, 13]
    assert v7(ex) == 'text about topic, with words such as "dog", "silent"'


# ----------------------------------------------------------------------------- surprisal and embedding bookkeeping


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from wsae_core import lm as L

    texts = ["the cat sat on the mat. a big red fox ran.", "the river carried timber to the coast."] * 20
    folder = L.make_tiny_gpt_neox(tmp_path_factory.mktemp("neox"), texts, n_layers=1, d_model=16, vocab_size=300)
    return L.load_lm(folder, precision="fp32")


def _decimals_at_most_4(values) -> bool:
    flat = [v for x in values for v in (x if isinstance(x, list) else [x])]
    return all(round(float(v), 4) == v for v in flat)


def test_surprisal_counts_every_token_it_runs(tiny_lm):
    """``tokens_run`` adds up every forward pass: the shared few-shot part once, each description's
    line, and every text (batches of one: no padding)."""
    assert I.SurprisalScorer(object(), model_name="m").batch_size == 16
    ids = lambda text: tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    texts = ["the cat sat", "a big red fox ran on the mat.", "the river"]
    sc = I.SurprisalScorer(tiny_lm, batch_size=1)
    sc.token_logprobs("cats", texts)
    line = lambda d: len(ids(I.surprisal_prefix(d)[len(I.SURPRISAL_SHOTS):]))  # noqa: E731
    first = len(ids(I.SURPRISAL_SHOTS)) + line("cats") + sum(len(ids(t)) for t in texts)
    assert sc.tokens_run == first
    sc.token_logprobs("rivers", texts[:2])
    assert sc.tokens_run == first + line("rivers") + sum(len(ids(t)) for t in texts[:2])
    # the key/value cache is asked for, also from a model whose configuration turns it off by default
    want = I.SurprisalScorer(tiny_lm).token_logprobs("cats", texts)
    tiny_lm.model.config.use_cache = False
    try:
        assert I.SurprisalScorer(tiny_lm).token_logprobs("cats", texts) == want
    finally:
        tiny_lm.model.config.use_cache = True


def test_surprisal_neutral_entries_per_kind_rounded_and_named(tiny_lm, tmp_path):
    """The neutral sums and the neutral per-token values are kept apart; a text seen before is
    reused while the new ones are computed; every stored number has 4 decimals; a refused miss names
    its key."""
    store = I.JsonlStore(tmp_path / "s.jsonl")
    sc = I.SurprisalScorer(tiny_lm, store=store)
    a, b = "the cat sat", "a big red fox ran on the mat."
    sums = sc._neutral_logliks([a])
    per_token = sc._neutral_tokens([a])
    n_a = len(tiny_lm.tokenizer(a, add_special_tokens=False)["input_ids"])
    assert sums[0][1] == n_a and len(per_token[0]) == n_a
    assert sums[0][0] == pytest.approx(sum(per_token[0]), abs=1e-3)
    both = sc._neutral_logliks([a, b])
    assert both[0] == sums[0] and both[1] == I.SurprisalScorer(tiny_lm)._neutral_logliks([b])[0]
    gains = sc.gains("cats", [a, b])
    spans = I.SurprisalScorer(tiny_lm, store=store, span=2, stride=1)
    span_gains = spans.gains("cats", [a, b])
    entries = [json.loads(l) for l in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert {e["kind"] for e in entries} == {"neutral", "neutral tokens", "explained"}
    for e in entries:
        assert _decimals_at_most_4(e["response"]), e["kind"]
    assert _decimals_at_most_4(gains) and _decimals_at_most_4(span_gains)
    strict = I.SurprisalScorer(tiny_lm, store=I.JsonlStore(tmp_path / "none.jsonl", allow_miss=False))
    with pytest.raises(I.CacheMiss, match=I._key([strict.identity, "neutral", a])):
        strict.gains("cats", [a])
    replay = I.SurprisalScorer(tiny_lm, store=I.JsonlStore(tmp_path / "s.jsonl", allow_miss=False))
    assert replay.gains("cats", [a, b]) == gains
    with pytest.raises(I.CacheMiss, match=I._key([replay.identity, "explained", "dogs", [a, b]])):
        replay.gains("dogs", [a, b])  # the neutral entries are there, the explained one is not


def test_embedding_score_returns_its_truth(tmp_path):
    import torch

    words = [v.strip() for v in VOCAB]
    bow = lambda texts: torch.tensor([[t.split().count(w) + 0.01 for w in words] for t in texts])  # noqa: E731
    pos = [_ex([2, 3, 4], [1, 0, 0], context=c) for c in range(2)]
    neg = [_ex([6, 7, 8], [0, 0, 0], context=c) for c in range(2, 5)]
    res = I.EmbeddingScorer(bow, span=None).score("cat", I.LatentExamples(0, 1.0, 2, pos, pos, neg), VOCAB)
    assert res.truth == [1, 1, 0, 0, 0] and res.auroc == 1.0
