"""Auto-interpretability (wsae_core.interp): example selection, prompts, metrics, parsing, the response
cache, the OpenAI-compatible client against a local server, and one real SmolLM2 call."""

import http.server
import json
import os
import threading
import time

import numpy as np
import pytest
from required import missing, require

from wsae_core import interp as I

VOCAB = ["<eos>", " the", " cat", " sat", " on", " mat", " dog", " ran", ".", "\n", " a", " big", " red", " fox"]


def toy(n_ctx=60, T=16, seed=0, fire_token=2, docs_per_ctx=True):
    """Random token contexts; a latent that fires on token 2 (" cat")."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, len(VOCAB), size=(n_ctx, T))
    tokens[tokens == fire_token] = 3
    hits = rng.random(n_ctx) < 0.5
    tokens[hits, rng.integers(0, T, size=hits.sum())] = fire_token
    acts = np.where(tokens == fire_token, 0.5 + rng.random(tokens.shape), 0.0).astype(np.float32)
    doc_ids = np.repeat(np.arange(n_ctx)[:, None], T, axis=1) if docs_per_ctx else None
    return tokens, acts, doc_ids


SMALL = I.SelectionConfig(n_explain_top=3, n_explain_quantile=2, n_score_activating=4, n_score_non_activating=4,
                          window_before=6, window_after=2)


# ----------------------------------------------------------------------------- selection


def test_selection_splits_and_marks():
    tokens, acts, docs = toy()
    ex = I.select_examples(tokens, acts, doc_ids=docs, config=SMALL, latent=7)
    assert len(ex.explain) == 5 and len(ex.activating) == 4 and len(ex.non_activating) == 4
    # Top contexts first, in decreasing order of their peak; no context used twice.
    peaks = [e.activations.max() for e in ex.explain[:3]]
    assert peaks == sorted(peaks, reverse=True) and np.isclose(peaks[0], acts.max())
    used = [e.context for e in ex.explain + ex.activating]
    assert len(set(used)) == len(used)
    assert set(used).isdisjoint(e.context for e in ex.non_activating)
    for e in ex.explain + ex.activating:
        assert e.activations.max() > 0 and e.marked.any()
        assert np.array_equal(e.marked, e.activations > 0.3 * ex.max_activation)
        assert e.token_ids.size <= SMALL.window_before + SMALL.window_after + 1
    for e in ex.non_activating:
        assert not e.activations.any() and not e.marked.any()
    # Deterministic.
    again = I.select_examples(tokens, acts, doc_ids=docs, config=SMALL, latent=7)
    assert [e.context for e in again.activating] == [e.context for e in ex.activating]


def test_one_context_per_document_and_windows_stay_in_document():
    tokens, acts, _ = toy(n_ctx=80)
    docs = np.repeat((np.arange(80) // 2)[:, None], 16, axis=1)  # two contexts per document
    docs[:, 8:] += 1000  # and a document boundary in the middle of each context
    ex = I.select_examples(tokens, acts, doc_ids=docs, config=SMALL)
    for e in ex.explain + ex.activating:
        d = docs[e.context, e.start : e.start + e.token_ids.size]
        assert (d == d[0]).all()
    seen = [docs[e.context, e.start] for e in ex.explain + ex.activating]
    assert len(set(seen)) == len(seen)


def test_not_enough_examples_and_bad_input():
    tokens, acts, docs = toy()
    sparse = acts.copy()
    sparse[5:] = 0
    with pytest.raises(I.NotEnoughExamples, match="fires in .* documents; scoring needs 9"):
        I.select_examples(tokens, sparse, doc_ids=docs, config=SMALL, latent="x")
    with pytest.raises(I.NotEnoughExamples, match="silent"):
        I.select_examples(tokens, np.ones_like(acts), config=SMALL)
    with pytest.raises(ValueError, match="must both be"):
        I.select_examples(tokens, acts[:, :3])
    with pytest.raises(ValueError, match="doc_ids must have the shape"):
        I.select_examples(tokens, acts, doc_ids=docs[:, :3])
    bad = acts.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        I.select_examples(tokens, bad)
    with pytest.raises(ValueError, match="mark_threshold must be in"):
        I.SelectionConfig(mark_threshold=1.5)
    with pytest.raises(ValueError, match="n_score_activating must be a positive"):
        I.SelectionConfig(n_score_activating=0)


# ----------------------------------------------------------------------------- formatting


def _ex(ids, marked, acts=None):
    ids = np.asarray(ids)
    return I.Example(0, 0, ids, np.zeros(ids.size, np.float32) if acts is None else np.asarray(acts, np.float32),
                     np.asarray(marked, bool))


def test_format_example_marks_runs_outside_whitespace():
    e = _ex([1, 2, 3, 4, 1, 5, 8], [0, 1, 0, 0, 0, 1, 1])
    assert I.format_example(e, VOCAB) == "the <<cat>> sat on the <<mat.>>"
    assert I.format_example(e, VOCAB, mark=False) == "the cat sat on the mat."
    assert I.format_example(e, VOCAB, marked=[1, 0, 0, 0, 0, 0, 0]) == "<<the>> cat sat on the mat."
    # Newlines are flattened so that each excerpt stays on one numbered line.
    assert I.format_example(_ex([1, 9, 2], [0, 0, 1]), VOCAB) == "the <<cat>>"
    with pytest.raises(ValueError, match="marked must have shape"):
        I.format_example(e, VOCAB, marked=[1, 0])


def test_random_marking_avoids_real_marks():
    e = _ex([1, 2, 3, 4, 1, 5], [0, 1, 0, 0, 0, 1])
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = I.random_marking(e, rng)
        assert m.sum() == 2 and not (m & e.marked).any()
    assert I.random_marking(_ex([1, 2], [1, 1]), rng) is None
    assert I.random_marking(_ex([1, 2], [0, 0]), rng) is None


def test_prompts():
    e = _ex([1, 2, 3], [0, 1, 0])
    m = I.explainer_messages([e, e], VOCAB)
    assert [x["role"] for x in m] == ["system", "user"]
    assert "1. the <<cat>> sat\n2. the <<cat>> sat" in m[1]["content"] and "<<this>>" in m[1]["content"]
    assert "Marked words: cat, cat" in m[1]["content"]
    assert "Marked words" not in I.explainer_messages([e], VOCAB, list_marked=False)[1]["content"]
    d = I.detection_messages("cats", "the cat sat")
    assert "Feature: cats" in d[1]["content"] and "Excerpt: the cat sat" in d[1]["content"]
    f = I.fuzzing_messages("cats", "the <<cat>> sat")
    assert "marked" in f[0]["content"] and "<<cat>>" in f[1]["content"]
    with pytest.raises(ValueError, match="at least one example"):
        I.explainer_messages([], VOCAB)


# ----------------------------------------------------------------------------- parsing and metrics


@pytest.mark.parametrize("text, want", [
    ("Yes", 1), ("No", 0), ("yes.", 1), ("**No**", 0), ("1", 1), ("0", 0), ("Answer: yes", 1),
    ("  No, the excerpt is about dogs.", 0), ("The answer is yes", 1), ("I think so", None),
    ("maybe yes, maybe no", None), ("", None), ("True", 1), ("false", 0),
])
def test_parse_yes_no(text, want):
    assert I.parse_yes_no(text) == want


def test_parse_explanation():
    assert I.parse_explanation("[EXPLANATION]: the word cat") == "the word cat"
    assert I.parse_explanation("The feature detects mentions of cats.\nMore text") == "mentions of cats."
    assert I.parse_explanation("The marked words share a common theme of counting and measurement,") == "counting and measurement"
    assert I.parse_explanation('\n\n"<<cat>> tokens"') == "cat tokens"
    assert I.parse_explanation("") == "(no explanation)"
    long = I.parse_explanation("word " * 100, max_chars=30)
    assert len(long) <= 33 and long.endswith("...")
    with pytest.raises(TypeError):
        I.parse_explanation(None)


def test_balanced_accuracy_known_cases():
    assert I.balanced_accuracy([1, 1, 0, 0], [1, 1, 0, 0]) == 1.0
    assert I.balanced_accuracy([1, 1, 0, 0], [1, 1, 1, 1]) == 0.5  # always yes: chance
    assert I.balanced_accuracy([1, 1, 1, 0], [1, 0, 0, 0]) == pytest.approx((1 / 3 + 1) / 2)
    assert I.balanced_accuracy([1, 0], [None, 0]) == 0.5  # an unparsed answer is wrong
    with pytest.raises(ValueError, match="both classes"):
        I.balanced_accuracy([1, 1], [1, 1])
    with pytest.raises(ValueError, match="only 0 and 1"):
        I.balanced_accuracy([2, 0], [1, 0])
    with pytest.raises(ValueError, match="equal length"):
        I.balanced_accuracy([1, 0], [1])


def test_roc_auc_known_cases():
    assert I.roc_auc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert I.roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert I.roc_auc([1, 0], [0.5, 0.5]) == 0.5
    assert I.roc_auc([1, 1, 0, 0], [0.9, 0.3, 0.5, 0.1]) == 0.75
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 400), rng.random(400)
    # Mann-Whitney definition against the rank-sum formula.
    ranks = np.argsort(np.argsort(s)) + 1
    n1, n0 = (y == 1).sum(), (y == 0).sum()
    assert I.roc_auc(y, s) == pytest.approx((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
    with pytest.raises(ValueError, match="both classes"):
        I.roc_auc([1, 1], [0.2, 0.3])


# ----------------------------------------------------------------------------- scoring and the cache


class Forbidden(I.ChatClient):
    """A client that must never be called (a replay from the cache is model-free)."""

    identity = "fake:keyword"

    def chat(self, messages, *, max_tokens=48):
        raise AssertionError("the model was called although every answer is cached")

    def score_options(self, prompts, options):
        raise AssertionError("the model was called although every answer is cached")


def test_keyword_client_scores_a_token_latent_perfectly():
    tokens, acts, docs = toy()
    ex = I.select_examples(tokens, acts, doc_ids=docs, config=SMALL, latent=1)
    s = I.score_latent(I.KeywordClient(), ex, VOCAB)
    assert s.explanation == 'the words "cat"'
    assert s.detection.balanced_accuracy == 1.0 and s.detection.auc == 1.0
    assert s.fuzzing.balanced_accuracy == 1.0 and s.score == 1.0
    assert s.detection.truth == [1] * 4 + [0] * 4 and len(s.fuzzing.truth) == 8


def test_cache_makes_a_second_run_identical_and_model_free(tmp_path):
    tokens, acts, docs = toy()
    ex = I.select_examples(tokens, acts, doc_ids=docs, config=SMALL, latent=1)
    live = I.CachedClient(I.KeywordClient(), tmp_path)
    first = I.score_latent(live, ex, VOCAB)
    assert live.misses == 1 + 8 + 8 and live.hits == 0
    replay = I.CachedClient(Forbidden(), tmp_path, allow_miss=False)
    second = I.score_latent(replay, ex, VOCAB)
    assert second == first and replay.hits == 17 and replay.misses == 0
    lines = (tmp_path / "fake_keyword.jsonl").read_text().splitlines()
    assert len(lines) == 17
    entry = json.loads(lines[0])
    assert set(entry) == {"key", "kind", "request", "response"} and entry["kind"] == "chat"
    # A request the cache does not hold: a clear error instead of a model call.
    other = I.detection_messages("dogs", "a dog ran")
    with pytest.raises(I.CacheMiss, match="not in the cache"):
        replay.score_options([other], I.YES_NO)
    # A torn last line (interrupted run) is ignored.
    with open(tmp_path / "fake_keyword.jsonl", "a") as f:
        f.write('{"key": "abc", "resp')
    assert I.score_latent(I.CachedClient(Forbidden(), tmp_path, allow_miss=False), ex, VOCAB) == first


def test_cache_keys_depend_on_client_and_parameters(tmp_path):
    m = I.detection_messages("cats", "the cat")
    a = I.CachedClient(I.KeywordClient(), tmp_path)
    a.chat(m, max_tokens=8)
    a.chat(m, max_tokens=9)
    assert a.misses == 2
    b = I.KeywordClient()
    b.identity = "fake:other"
    I.CachedClient(b, tmp_path).chat(m, max_tokens=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake_keyword.jsonl", "fake_other.jsonl"]


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("WSAE_INTERP_CACHE", str(tmp_path / "c"))
    assert I.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("WSAE_INTERP_CACHE")
    assert I.default_cache_dir().parts[-3:] == ("book", "results", "interp_cache")


class TextOnly(I.ChatClient):
    """No log-probabilities: the scorers must parse rambling text."""

    identity = "fake:text"

    def __init__(self, replies):
        self.replies = list(replies)

    def chat(self, messages, *, max_tokens=48):
        return self.replies.pop(0)


def test_text_fallback_parses_and_counts_unparsed_as_wrong():
    e_pos = _ex([1, 2, 3], [0, 1, 0], [0, 1, 0])
    e_neg = _ex([1, 6, 3], [0, 0, 0])
    ex = I.LatentExamples(0, 1.0, 10, [e_pos], [e_pos, e_pos], [e_neg, e_neg])
    client = TextOnly(["Yes, clearly.", "hmm, hard to say", "No.", "**no**"])
    r = I.detection(client, "cats", ex, VOCAB)
    assert r.pred == [1, None, 0, 0] and r.balanced_accuracy == 0.75 and np.isnan(r.auc)


def test_bad_messages_are_rejected():
    with pytest.raises(ValueError, match="non-empty list"):
        I.CachedClient(I.KeywordClient(), "/nonexistent").chat([])
    with pytest.raises(ValueError, match="role"):
        I.KeywordClient().chat([{"role": "robot", "content": "x"}])


# ----------------------------------------------------------------------------- OpenAI-compatible endpoint


class FakeServer(http.server.BaseHTTPRequestHandler):
    """/v1/chat/completions and /v1/completions; ``fail`` first requests answer 503, ``slow``
    requests sleep past the client's timeout."""

    state: dict = {}

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        st = self.state
        st.setdefault("requests", []).append((self.path, body, self.headers.get("Authorization")))
        if st.get("fail", 0) > 0:
            st["fail"] -= 1
            return self._send(503, {"error": "overloaded"})
        if st.get("slow", 0) > 0:
            st["slow"] -= 1
            time.sleep(0.6)
        if st.get("bad_request"):
            return self._send(400, {"error": "bad model"})
        if self.path == "/v1/chat/completions":
            text = body["messages"][-1]["content"]
            yes = "cat" in text.split("Excerpt:")[-1]
            msg = {"role": "assistant", "content": "Yes" if yes else "No"}
            choice = {"index": 0, "message": msg, "finish_reason": "stop"}
            if body.get("logprobs"):
                top = [{"token": "Yes", "logprob": -0.1 if yes else -2.5}, {"token": " no", "logprob": -2.4 if yes else -0.2},
                       {"token": "The", "logprob": -4.0}]
                choice["logprobs"] = {"content": [{"token": msg["content"], "logprob": -0.1, "top_logprobs": top}]}
            return self._send(200, {"choices": [choice]})
        if self.path == "/v1/completions":
            yes = "cat" in body["prompt"].split("Excerpt:")[-1]
            top = {" Yes": -0.3 if yes else -1.9, " No": -1.5 if yes else -0.4}
            return self._send(200, {"choices": [{"text": " Yes", "logprobs": {"top_logprobs": [top]}}]})
        self._send(404, {"error": "no such route"})

    def _send(self, code, obj):
        send_json(self, code, json.dumps(obj).encode())


def send_json(handler: http.server.BaseHTTPRequestHandler, code: int, data: bytes) -> None:
    """A stub endpoint's JSON reply (shared with tests/test_interp_clients.py)."""
    try:
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the client timed out and closed the connection: expected in the timeout tests


@pytest.fixture
def server():
    FakeServer.state = {}
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", FakeServer.state
    srv.shutdown()
    srv.server_close()


def test_endpoint_chat_and_logprobs(server, monkeypatch):
    url, state = server
    monkeypatch.setenv("WSAE_INTERP_API_KEY", "secret")
    c = I.OpenAIClient(url, "llama-test", backoff=0.01)
    assert c.identity == "openai:llama-test"
    assert c.chat(I.detection_messages("cats", "the cat sat")) == "Yes"
    path, body, auth = state["requests"][-1]
    assert path == "/v1/chat/completions" and body["model"] == "llama-test" and body["temperature"] == 0
    assert auth == "Bearer secret"
    lp = c.score_options([I.detection_messages("cats", "the cat sat"), I.detection_messages("cats", "a dog")], I.YES_NO)
    assert lp[0] == [-0.1, -2.4] and lp[1] == [-2.5, -0.2]  # " no" pooled with "No"; case and spaces ignored
    comp = I.OpenAIClient(url, "llama-test", logprobs="completions")
    lp = comp.score_options([I.detection_messages("cats", "the cat sat")], I.YES_NO)
    assert lp == [[-0.3, -1.5]]
    assert state["requests"][-1][1]["prompt"].endswith("Assistant:")


def test_endpoint_scores_a_latent_through_the_cache(server, tmp_path):
    url, state = server
    tokens, acts, docs = toy()
    ex = I.select_examples(tokens, acts, doc_ids=docs, config=SMALL, latent=1)
    client = I.CachedClient(I.OpenAIClient(url, "llama-test"), tmp_path)
    s = I.detection(client, "cat", ex, VOCAB)
    assert s.balanced_accuracy == 1.0 and s.auc == 1.0
    n = len(state["requests"])
    assert I.detection(client, "cat", ex, VOCAB) == s and len(state["requests"]) == n


def test_endpoint_retries_then_succeeds(server):
    url, state = server
    state["fail"] = 2
    c = I.OpenAIClient(url, "m", max_retries=3, backoff=0.01)
    assert c.chat(I.detection_messages("x", "cat")) == "Yes"
    assert c.n_requests == 3


def test_endpoint_gives_up_after_retries(server):
    url, state = server
    state["fail"] = 10
    c = I.OpenAIClient(url, "m", max_retries=2, backoff=0.01)
    with pytest.raises(I.EndpointError, match="HTTP 503.*gave up after 3 attempts"):
        c.chat(I.detection_messages("x", "cat"))
    assert c.n_requests == 3


def test_endpoint_timeout_is_retried(server):
    url, state = server
    state["slow"] = 1
    c = I.OpenAIClient(url, "m", timeout=0.2, max_retries=1, backoff=0.01)
    t = time.perf_counter()
    assert c.chat(I.detection_messages("x", "cat")) == "Yes"
    assert c.n_requests == 2 and time.perf_counter() - t < 5
    state["slow"] = 5
    with pytest.raises(I.EndpointError, match="timeout 0.2 s"):
        I.OpenAIClient(url, "m", timeout=0.2, max_retries=0).chat(I.detection_messages("x", "cat"))


def test_endpoint_client_errors_are_not_retried(server):
    url, state = server
    state["bad_request"] = True
    c = I.OpenAIClient(url, "m", max_retries=3, backoff=0.01)
    with pytest.raises(I.EndpointError, match="HTTP 400"):
        c.chat(I.detection_messages("x", "cat"))
    assert c.n_requests == 1


def test_endpoint_unreachable_and_configuration(monkeypatch):
    c = I.OpenAIClient("http://127.0.0.1:9/v1", "m", timeout=1, max_retries=1, backoff=0.01)
    with pytest.raises(I.EndpointError, match="gave up after 2 attempts"):
        c.chat(I.detection_messages("x", "cat"))
    monkeypatch.delenv("WSAE_INTERP_MODEL", raising=False)
    with pytest.raises(ValueError, match="WSAE_INTERP_MODEL"):
        I.OpenAIClient("http://127.0.0.1:9/v1")
    monkeypatch.setenv("WSAE_INTERP_MODEL", "from-env")
    monkeypatch.setenv("WSAE_INTERP_BASE_URL", "http://example.invalid:8000/v1/")
    c = I.OpenAIClient()
    assert c.model == "from-env" and c.base_url == "http://example.invalid:8000/v1"
    with pytest.raises(ValueError, match="http"):
        I.OpenAIClient("ftp://x", "m")
    with pytest.raises(ValueError, match="logprobs must be"):
        I.OpenAIClient("http://x", "m", logprobs="maybe")


# ----------------------------------------------------------------------------- the real offline model


@pytest.mark.skipif(os.environ.get("WSAE_SKIP_SMOLLM2") == "1", reason="WSAE_SKIP_SMOLLM2=1 (make mutation)")
def test_smollm2_option_scoring_and_chat():
    """The one test that loads SmolLM2-135M-Instruct (~15 s): batched option scoring equals one-by-one
    scoring, and a chat reply is a string."""
    require("gguf")
    from wsae_core.lm import smollm2_location

    try:
        smollm2_location()
    except (ImportError, FileNotFoundError) as err:
        missing(str(err))
    c = I.HFChatClient(batch_size=4)
    assert c.identity == "hf:smollm2-135m-instruct-gguf-q4_1:float32"
    prompts = [I.detection_messages("the word cat", t) for t in ("The cat sat.", "Stock prices fell sharply today.", "A dog")]
    batched = c.score_options(prompts, I.YES_NO)
    single = [c.score_options([p], I.YES_NO)[0] for p in prompts]
    np.testing.assert_allclose(batched, single, atol=2e-3)
    assert all(len(b) == 2 and all(v < 0 for v in b) for b in batched)
    multi = c.score_options(prompts[:1], ["Yes indeed", "No"])  # multi-token option path
    assert len(multi[0]) == 2 and multi[0][0] < batched[0][0]
    reply = c.chat(I.detection_messages("the word cat", "The cat sat."), max_tokens=4)
    assert isinstance(reply, str) and reply


# ----------------------------------------------------------------------------- calibration runner


def test_planted_latent_calibration_with_the_keyword_client():
    """The calibration runner on planted latents: a keyword judge scores a token latent perfectly and a
    random latent near chance (the real judge's run is in the chapter)."""
    require("gguf")
    from wsae_core.experiments import interp as E

    try:
        E.load_tokenizer()
    except (ImportError, FileNotFoundError) as err:
        missing(str(err))
    spec = E.CalibrationSpec(n_contexts=512, tokens=(" species", " city"), topics=("People",), n_random=2)
    res = E.run_calibration(I.KeywordClient(), spec)
    by = {r["latent"]: r for r in res["records"]}
    assert set(by) == {"token 'species'", "token 'city'", "topic People", "random 0", "random 1"}
    for name in ("token 'species'", "token 'city'"):
        assert by[name]["detection"] >= 0.9 and by[name]["fuzzing"] == 1.0, by[name]
        assert name.split("'")[1] in by[name]["explanation"]
    summ = E.calibration_summary(res)
    assert summ["random"]["fuzzing"] <= 0.75 and summ["token"]["score"] > summ["random"]["score"]
    with pytest.raises(ValueError, match="single-token"):
        E.run_calibration(I.KeywordClient(), E.CalibrationSpec(tokens=(" xylophonicallyzz",)))


def test_gates_file_names_a_surprisal_span_other_than_the_default():
    """Calibrations with another surprisal span get their own file (they would overwrite the default's)."""
    from wsae_core.experiments import interp as E

    default = E.SURPRISAL_OPTIONS["span"]
    assert E.gates_file(0, ("baseline",), ("surprisal",)) == "interp_gates_seed0_baseline_surprisal.json"
    assert E.gates_file(0, ("baseline",), ("surprisal",), default) == "interp_gates_seed0_baseline_surprisal.json"
    assert E.gates_file(3, ("baseline",), ("surprisal",), 1) == "interp_gates_seed3_baseline_surprisal_surprisal-span1.json"
    assert E.gates_file(0, ("baseline", "smollm2"), ("surprisal", "embedding"), None) == \
        "interp_gates_seed0_baseline+smollm2_surprisal+embedding_surprisal-whole.json"
    assert E.gates_file(0, ("baseline",), ("embedding",), 1) == "interp_gates_seed0_baseline_embedding.json"


def test_score_latents_scores_each_selectable_latent_and_skips_the_rest():
    """``score_latents`` is ``score_latent`` per latent (selection seeded by the config), skipping with a
    progress line the latents that have too few examples, in the order given."""
    tokens, acts, docs = toy()
    table = {"cat": acts, "never": np.zeros_like(acts), "cat again": acts}
    lines = []
    got = I.score_latents(I.KeywordClient(), tokens, table.__getitem__, ["cat", "never", "cat again"], VOCAB,
                          doc_ids=docs, config=SMALL, progress=lines.append)
    want = I.score_latent(I.KeywordClient(), I.select_examples(tokens, acts, doc_ids=docs, config=SMALL, latent="cat"),
                          VOCAB, seed=SMALL.seed)
    assert len(got) == 2 and got[0] == want and got[1].latent == "cat again"
    assert lines[0] == "'cat': 'the words \"cat\"' detection 1.00 fuzzing 1.00"
    assert lines[1].startswith("skip 'never': ") and lines[2].startswith("'cat again': ")
    assert I.score_latents(I.KeywordClient(), tokens, table.__getitem__, ["cat"], VOCAB) == \
        I.score_latents(I.KeywordClient(), tokens, table.__getitem__, ["cat"], VOCAB, config=I.SelectionConfig())


# ----------------------------------------------------------------------------- selection details


def test_window_bounds_clip_to_the_context_and_the_document():
    cfg = I.SelectionConfig(window_before=3, window_after=2)
    assert I._window(None, 10, 30, cfg) == (7, 13)  # 3 before, the token, 2 after
    assert I._window(None, 1, 30, cfg) == (0, 4) and I._window(None, 29, 30, cfg) == (26, 30)
    docs = np.array([0] * 9 + [1] * 21)
    assert I._window(docs, 10, 30, cfg) == (9, 13)  # the window starts where document 1 does
    assert I._window(docs, 7, 30, cfg) == (4, 9)  # and ends where document 0 does
    zero = I.SelectionConfig(window_before=0, window_after=0)
    assert I._window(None, 5, 30, zero) == (5, 6)


def test_stratified_draws_one_per_bin_also_for_one_bin():
    rng = np.random.default_rng(0)
    order = np.arange(10)
    assert len(I._stratified(order, 1, rng)) == 1
    got = I._stratified(order, 5, rng)
    assert [g // 2 for g in got] == [0, 1, 2, 3, 4]  # one from each pair of equal bins
    assert I._stratified(order, 0, rng) == [] and I._stratified(order[:0], 3, rng) == []
    assert sorted(I._stratified(order[:2], 5, rng)) == [0, 1]  # fewer items than bins: each once


def test_negative_window_centres():
    """Random centres lie at least ``window_before`` into the context (a full window before them);
    fixed centres are uniform over every position (0 included) and the same for every latent;
    contexts no longer than ``window_before`` get centre 0."""
    cfg = I.SelectionConfig(window_before=3)
    rng = np.random.default_rng(0)
    ctx = np.arange(2000)
    c = I._negative_centres(ctx, (2000, 6), cfg, rng)
    assert c.min() == 3 and c.max() == 5
    assert np.array_equal(I._negative_centres(ctx[:4], (2000, 3), cfg, rng), np.zeros(4, int))
    assert np.array_equal(I._negative_centres(ctx[:4], (2000, 2), cfg, rng), np.zeros(4, int))
    assert np.array_equal(I._negative_centres(ctx[:4], (2000, 4), cfg, rng), np.full(4, 3))
    fixed = I.SelectionConfig(window_before=3, fixed_negative_windows=True)
    f = I._negative_centres(ctx, (2000, 6), fixed, rng)
    assert f.min() == 0 and f.max() == 5
    assert np.array_equal(f[[5, 7]], I._negative_centres(np.array([5, 7]), (2000, 6), fixed, np.random.default_rng(9)))


def test_selection_dtypes_and_per_latent_draws():
    """Examples hold int64 ids and float32 activations whatever the input dtypes; the random draws
    depend on the latent (two latents with the same activations get different quantile and negative
    contexts) and a NumPy integer names the same latent as the Python int."""
    tokens, acts, docs = toy(n_ctx=200, seed=3)
    ex = I.select_examples(tokens.astype(np.int32), acts.astype(np.float64), doc_ids=docs, config=SMALL, latent=1)
    for e in ex.explain + ex.activating + ex.non_activating:
        assert e.token_ids.dtype == np.int64 and e.activations.dtype == np.float32
    draws = {}
    for lat in (1, 2, np.int64(1), "one"):
        e = I.select_examples(tokens, acts, doc_ids=docs, config=SMALL, latent=lat)
        draws[repr(lat)] = tuple(x.context for x in e.activating + e.non_activating)
    assert draws["1"] == draws[repr(np.int64(1))]
    assert len({draws["1"], draws["2"], draws["'one'"]}) == 3


def test_selection_config_bounds():
    for name in ("n_explain_top", "n_score_activating", "n_score_non_activating"):
        assert getattr(I.SelectionConfig(**{name: 1}), name) == 1
        with pytest.raises(ValueError, match=f"{name} must be a positive integer, got 0"):
            I.SelectionConfig(**{name: 0})
    for name in ("n_explain_quantile", "window_before", "window_after"):
        assert getattr(I.SelectionConfig(**{name: 0}), name) == 0
        with pytest.raises(ValueError, match=f"{name} must be >= 0, got -1"):
            I.SelectionConfig(**{name: -1})
    assert I.SelectionConfig(mark_threshold=0.0).mark_threshold == 0.0
    assert I.SelectionConfig(mark_threshold=0.99).mark_threshold == 0.99
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"mark_threshold must be in \[0, 1\)"):
            I.SelectionConfig(mark_threshold=bad)


class Recorder(I.KeywordClient):
    """The keyword judge, recording every chat request and every option-scoring prompt."""

    def __init__(self):
        super().__init__()
        self.chats, self.prompts = [], []

    def chat(self, messages, *, max_tokens=48):
        self.chats.append((messages, max_tokens))
        return super().chat(messages, max_tokens=max_tokens)

    def score_options(self, prompts, options):
        self.prompts += list(prompts)
        return super().score_options(prompts, options)


def test_explain_detect_fuzz_send_what_they_document():
    """The explainer gets the explanation contexts with ``max_tokens`` (default 40); ``score_latent``
    keeps the latent and passes its seed to fuzzing; fuzzing sends each fuzzable context twice (right
    and random marks, the explanation in both), skipping, not stopping at, a context it cannot fuzz."""
    tokens, acts, docs = toy()
    ex = I.select_examples(tokens, acts, doc_ids=docs, config=SMALL, latent=1)
    rec = Recorder()
    expl = I.explain(rec, ex, VOCAB)
    assert rec.chats == [(I.explainer_messages(ex.explain, VOCAB), 40)]
    I.explain(rec, ex, VOCAB, max_tokens=7)
    assert rec.chats[-1][1] == 7
    s0, s5 = I.score_latent(Recorder(), ex, VOCAB), I.score_latent(Recorder(), ex, VOCAB, seed=5)
    assert s0.latent == 1 and s0.explanation == expl
    r0, r5, rd = Recorder(), Recorder(), Recorder()
    I.fuzzing(r0, expl, ex, VOCAB, seed=0), I.fuzzing(r5, expl, ex, VOCAB, seed=5), I.fuzzing(rd, expl, ex, VOCAB)
    assert rd.prompts == r0.prompts != r5.prompts
    rng = np.random.default_rng(0)
    want = []
    for e in ex.activating:
        fake = I.random_marking(e, rng)
        want += [I.fuzzing_messages(expl, I.format_example(e, VOCAB)),
                 I.fuzzing_messages(expl, I.format_example(e, VOCAB, marked=fake))]
    assert r0.prompts == want
    # an activating window with every token marked cannot be fuzzed: skipped, the others still are
    full = ex.activating[0]._replace(marked=np.ones_like(ex.activating[0].marked))
    rs = Recorder()
    res = I.fuzzing(rs, expl, ex._replace(activating=[full, *ex.activating[1:]]), VOCAB)
    assert len(rs.prompts) == 2 * (len(ex.activating) - 1) and len(res.truth) == len(rs.prompts)
    assert I.fuzzing(Recorder(), expl, ex._replace(activating=[full]), VOCAB) is None


def test_prompt_texts_exactly():
    tokens, acts, docs = toy()
    ex = I.select_examples(tokens, acts, doc_ids=docs, config=SMALL, latent=1)
    with_list = I.explainer_messages(ex.explain, VOCAB)[1]["content"]
    without = I.explainer_messages(ex.explain, VOCAB, list_marked=False)[1]["content"]
    line = "\n\nMarked words: " + ", ".join(I.marked_words(ex.explain, VOCAB))
    assert line in with_list and without == with_list.replace(line, "")
    texts, truth = I.scoring_texts(ex, VOCAB)
    assert texts == [I.format_example(e, VOCAB, mark=False) for e in ex.activating + ex.non_activating]
    assert truth == [1] * len(ex.activating) + [0] * len(ex.non_activating)
    assert not any(I.MARK_OPEN in t for t in texts)
    assert I.surprisal_prefix("a  word\n about\tcats") == I.SURPRISAL_SHOTS + "Description: a word about cats\nSentences:\n"
    words = I.marked_words([_ex([2, 9, 2, 9, 2, 9, 2, 9, 2, 9, 2, 9, 2, 9, 2, 9, 2, 9, 2, 9, 2, 9, 2, 9],
                                [1, 0] * 12)], VOCAB)
    assert words == ["cat"] * 12
    words = I.marked_words([_ex([2, 9] * 12, [1, 0] * 12)] * 2, VOCAB)
    assert len(words) == 20 and I.marked_words([_ex([2, 9] * 12, [1, 0] * 12)] * 2, VOCAB, limit=21) == ["cat"] * 21


@pytest.mark.parametrize("text, want", [("Answer: yes, not no", 1), ("answer: No. Yes would be wrong", 0),
                                        ("ANSWER no (yes?)", 0)])
def test_parse_yes_no_skips_an_answer_prefix(text, want):
    """The first word after an "Answer:" prefix decides, even when the reply goes on to name the other."""
    assert I.parse_yes_no(text) == want


@pytest.mark.parametrize("per_document", [False, True])
def test_selection_at_its_limits(per_document):
    """Exactly as many activating contexts as needed (3 top + 2 quantile + 4 held out) and exactly as
    many silent ones as detection needs: each activating context is used once, the strongest three
    go first, marks are the tokens above 0.3 of the latent's maximum."""
    T, need = 16, SMALL.n_activating_needed
    tokens = np.tile(np.arange(1, T + 1) % len(VOCAB), (need + 4, 1))
    acts = np.zeros(tokens.shape, np.float32)
    peaks = np.linspace(2.0, 0.5, need).astype(np.float32)
    for c, pk in enumerate(peaks):
        acts[c, 8], acts[c, 9] = pk, 0.25 * pk  # the second token stays below 0.3 of the maximum
    cfg = I.SelectionConfig(**{**SMALL.__dict__, "negatives_per_document": per_document})
    ex = I.select_examples(tokens, acts, config=cfg, latent=3)
    assert ex.max_activation == pytest.approx(2.0) and ex.n_activating == need
    used = [e.context for e in ex.explain + ex.activating]
    assert sorted(used) == list(range(need)) and used[:3] == [0, 1, 2]
    assert sorted(e.context for e in ex.non_activating) == list(range(need, need + 4))
    for e in ex.explain + ex.activating:
        assert np.array_equal(e.marked, e.activations > 0.3 * 2.0)
    weakest = [e for e in ex.explain + ex.activating if e.context == need - 1][0]
    assert ex.explain[0].marked.sum() == 1 and weakest.marked.sum() == 0  # 0.5 < 0.3 * 2.0
    with pytest.raises(I.NotEnoughExamples, match="fires in 8 documents; scoring needs 9"):
        I.select_examples(tokens[1:], np.delete(acts, 0, axis=0)[:, :], config=cfg)
    with pytest.raises(I.NotEnoughExamples, match="silent in only 3 contexts"):
        I.select_examples(tokens[:-1], acts[:-1], config=cfg)


def test_format_example_puts_newlines_on_one_line():
    """A prompt shows each excerpt on one line: newline tokens become spaces (marked or not)."""
    assert I.format_example(_ex([1, 9, 2], [0, 0, 0]), VOCAB) == "the cat"
    assert "\n" not in I.format_example(_ex([1, 9, 2, 9], [0, 1, 1, 0]), VOCAB)
    assert I.format_example(_ex([1, 9, 2], [0, 0, 1]), VOCAB, marked=[1, 0, 0]) == "<<the>> cat"


def test_parse_explanation_finds_a_later_labelled_line_and_cuts_at_160():
    assert I.parse_explanation("Let me look at the excerpts.\nEXPLANATION: the word cat") == "the word cat"
    assert I.parse_explanation("Some thoughts first.\n[Explanation] : dates and years") == "dates and years"
    cut = I.parse_explanation(("word " * 60).strip())
    assert cut.endswith("...") and 150 <= len(cut) - 3 <= 160 and len(I.parse_explanation("w " * 79 + "w")) == 159
    content = I.explainer_messages([_ex([1, 2], [0, 1])], VOCAB)[1]["content"]
    assert content.startswith("Text excerpts, with some words marked like <<this>>:\n1. the <<cat>>")
    assert content.endswith('\n\nMarked words: cat\n\nWhat do the marked words have in common?')
