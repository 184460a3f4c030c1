"""The client plumbing of wsae_core.interp, against independently stated expectations: the exact
requests an OpenAI-compatible endpoint receives (payload, headers), the retry policy and its
backoff waits, error messages (masked key, failing URL), configuration defaults and validation,
option scoring from top log-probabilities, the response cache's file entries and keys, the
keyword client's scores and the default cache folder.

Every endpoint is a stub server on 127.0.0.1 (no network); ``time.sleep`` is replaced by a recorder,
so the backoff waits are checked without waiting."""

import hashlib
import http.server
import json
import math
import socket
import threading

import pytest
from test_interp import send_json

from wsae_core import interp as I

ENV = ("WSAE_INTERP_API_KEY", "OPENAI_API_KEY", "WSAE_INTERP_BASE_URL", "OPENAI_BASE_URL", "WSAE_INTERP_MODEL",
       "WSAE_INTERP_CACHE")
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is this a cat?"}]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def waits(monkeypatch):
    """The seconds the client would have slept between attempts (nothing sleeps)."""
    got = []
    monkeypatch.setattr(I.time, "sleep", got.append)
    return got


# ----------------------------------------------------------------------------- a scripted stub endpoint


def ok_chat(content="Yes"):
    return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}


def chat_top(top: dict):
    """A /chat/completions reply whose first token has ``top`` as its top log-probabilities."""
    lp = {"content": [{"token": "x", "logprob": -0.1, "top_logprobs": [{"token": t, "logprob": v} for t, v in top.items()]}]}
    return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "logprobs": lp}]}


def completion_top(top: dict):
    return 200, {"choices": [{"text": " x", "logprobs": {"top_logprobs": [top]}}]}


HANG = object()


class Stub(http.server.BaseHTTPRequestHandler):
    """Records every request; answers with the next scripted reply ``(code, json object or raw bytes)``,
    else ``default``; ``HANG`` holds the connection open without answering."""

    def log_message(self, *a):
        pass

    def do_POST(self):
        st = self.server.state
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        st["requests"].append({"path": self.path, "method": self.command, "body": json.loads(raw),
                               "content_type": self.headers.get("Content-Type"),
                               "authorization": self.headers.get("Authorization")})
        reply = st["replies"].pop(0) if st["replies"] else st["default"]
        if reply is HANG:
            st["release"].wait(5)
            return
        code, obj = reply
        send_json(self, code, obj if isinstance(obj, bytes) else json.dumps(obj).encode())


class Endpoint:
    def __init__(self, srv):
        self.srv = srv
        self.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"

    @property
    def requests(self):
        return self.srv.state["requests"]

    def script(self, *replies):
        self.srv.state["replies"].extend(replies)

    def always(self, reply):
        self.srv.state["default"] = reply


@pytest.fixture
def stub():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    srv.state = {"requests": [], "replies": [], "default": ok_chat(), "release": threading.Event()}
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    yield Endpoint(srv)
    srv.state["release"].set()
    srv.shutdown()
    srv.server_close()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ----------------------------------------------------------------------------- configuration


def test_documented_defaults(monkeypatch):
    c = I.OpenAIClient(model="m")
    assert c.base_url == "http://127.0.0.1:8000/v1"
    assert (c.timeout, c.max_retries, c.backoff, c.max_backoff) == (60.0, 4, 1.0, 30.0)
    assert (c.logprobs, c.top_logprobs, c.api_key_env) == ("chat", 20, "WSAE_INTERP_API_KEY")
    assert c.identity == "openai:m" and c.n_requests == 0


def test_base_url_fallbacks_and_trailing_slash(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://openai.example:1/v1/")
    assert I.OpenAIClient(model="m").base_url == "http://openai.example:1/v1"
    monkeypatch.setenv("WSAE_INTERP_BASE_URL", "http://wsae.example:2/v1")
    assert I.OpenAIClient(model="m").base_url == "http://wsae.example:2/v1"
    assert I.OpenAIClient("http://given.example:3/v1", "m").base_url == "http://given.example:3/v1"
    # Only slashes are stripped, whatever the path ends with.
    assert I.OpenAIClient("http://h:1/PREFIX/", "m").base_url == "http://h:1/PREFIX"
    assert I.OpenAIClient("http://h:1/v1//", "m").base_url == "http://h:1/v1"


def test_schemes():
    assert I.OpenAIClient("https://api.example.com/v1", "m").base_url == "https://api.example.com/v1"
    assert I.OpenAIClient("http://api.example.com/v1", "m").base_url == "http://api.example.com/v1"
    for bad in ("ftp://x/v1", "HTTPS://x/v1", "127.0.0.1:8000/v1", "file:///etc"):
        with pytest.raises(ValueError, match="http:// or https://"):
            I.OpenAIClient(bad, "m")


def test_api_key_env_must_be_an_identifier(monkeypatch):
    for good in ("my_key", "_k", "Key2", "WSAE_INTERP_API_KEY"):
        assert I.OpenAIClient("http://h/v1", "m", api_key_env=good).api_key_env == good
    for bad in ("1KEY", "A-B", "", "KEY NAME", "sk-abc123", 5, None):
        with pytest.raises(ValueError, match="api_key_env"):
            I.OpenAIClient("http://h/v1", "m", api_key_env=bad)


def test_logprobs_modes():
    for mode in ("chat", "completions", "none"):
        assert I.OpenAIClient("http://h/v1", "m", logprobs=mode).logprobs == mode
    for bad in ("NONE", "Chat", "", None):
        with pytest.raises(ValueError, match="logprobs must be"):
            I.OpenAIClient("http://h/v1", "m", logprobs=bad)


def test_numeric_bounds():
    ok = I.OpenAIClient("http://h/v1", "m", timeout=0.001, max_retries=0, backoff=0)
    assert (ok.timeout, ok.max_retries, ok.backoff) == (0.001, 0, 0.0)
    for kw in ({"timeout": 0}, {"timeout": -1}, {"max_retries": -1}, {"backoff": -0.5}):
        with pytest.raises(ValueError, match="timeout must be > 0"):
            I.OpenAIClient("http://h/v1", "m", **kw)


def test_repr_names_the_variable_never_the_key(monkeypatch):
    c = I.OpenAIClient("http://h:1/v1", "m")
    assert repr(c) == "OpenAIClient(base_url='http://h:1/v1', model='m', api_key=none)"
    monkeypatch.setenv("WSAE_INTERP_API_KEY", "sk-secret-1")
    c = I.OpenAIClient("http://h:1/v1", "m")
    assert repr(c) == "OpenAIClient(base_url='http://h:1/v1', model='m', api_key=from $WSAE_INTERP_API_KEY)"
    monkeypatch.setenv("my_key", "sk-secret-2")
    c = I.OpenAIClient("http://h:1/v1", "m", api_key_env="my_key")
    assert repr(c) == "OpenAIClient(base_url='http://h:1/v1', model='m', api_key=from $my_key)"


def test_mask(monkeypatch):
    assert I.OpenAIClient("http://h/v1", "m")._mask("auth: Bearer abc.def-1 ok") == "auth: Bearer *** ok"
    monkeypatch.setenv("WSAE_INTERP_API_KEY", "sk-abc")
    c = I.OpenAIClient("http://h/v1", "m")
    assert c._mask("key sk-abc, header BEARER  tok/1 and bearer sk-abc") == "key ***, header BEARER  *** and bearer ***"
    assert c._mask("nothing secret") == "nothing secret"


def test_render():
    text = I.OpenAIClient.render(MSGS + [{"role": "assistant", "content": "Maybe."}])
    assert text == "System: Be brief.\n\nUser: Is this a cat?\n\nAssistant: Maybe.\n\nAssistant:"
    assert I.OpenAIClient.render([{"role": "user", "content": "hi"}]) == "User: hi\n\nAssistant:"


# ----------------------------------------------------------------------------- requests


def test_chat_request_and_headers(stub, monkeypatch):
    monkeypatch.setenv("WSAE_INTERP_API_KEY", "sk-env")
    c = I.OpenAIClient(stub.url + "/", "llama-x")
    assert c.chat(MSGS) == "Yes"
    r = stub.requests[-1]
    assert r["path"] == "/v1/chat/completions" and r["method"] == "POST"
    assert r["body"] == {"model": "llama-x", "messages": MSGS, "max_tokens": 48, "temperature": 0.0, "seed": 0}
    assert r["content_type"] == "application/json" and r["authorization"] == "Bearer sk-env"
    stub.script(ok_chat("  Two words \n"))
    assert c.chat(MSGS, max_tokens=5) == "Two words"
    assert stub.requests[-1]["body"]["max_tokens"] == 5


def test_key_falls_back_to_openai_api_key_and_is_optional(stub, monkeypatch):
    I.OpenAIClient(stub.url, "m").chat(MSGS)
    assert stub.requests[-1]["authorization"] is None
    assert stub.requests[-1]["content_type"] == "application/json"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    I.OpenAIClient(stub.url, "m").chat(MSGS)
    assert stub.requests[-1]["authorization"] == "Bearer sk-openai"
    monkeypatch.setenv("WSAE_INTERP_API_KEY", "sk-wsae")
    I.OpenAIClient(stub.url, "m").chat(MSGS)
    assert stub.requests[-1]["authorization"] == "Bearer sk-wsae"
    monkeypatch.setenv("my_key", "sk-mine")
    I.OpenAIClient(stub.url, "m", api_key_env="my_key").chat(MSGS)
    assert stub.requests[-1]["authorization"] == "Bearer sk-mine"


def test_chat_empty_or_missing_content(stub):
    c = I.OpenAIClient(stub.url, "m")
    stub.script(ok_chat(None), ok_chat(""), (200, {"choices": []}))
    assert c.chat(MSGS) == ""
    assert c.chat(MSGS) == ""
    with pytest.raises(I.EndpointError, match="unexpected chat response from " + stub.url):
        c.chat(MSGS)


def test_option_scoring_chat_request(stub):
    stub.always(chat_top({"Yes": -0.25, "No": -1.5}))
    c = I.OpenAIClient(stub.url, "m")
    assert c.score_options([MSGS], ("Yes", "No")) == [[-0.25, -1.5]]
    r = stub.requests[-1]
    assert r["path"] == "/v1/chat/completions"
    assert r["body"] == {"model": "m", "messages": MSGS, "max_tokens": 1, "temperature": 0.0, "logprobs": True,
                         "top_logprobs": 20}
    I.OpenAIClient(stub.url, "m", top_logprobs=5).score_options([MSGS], ("Yes", "No"))
    assert stub.requests[-1]["body"]["top_logprobs"] == 5


def test_option_scoring_completions_request(stub):
    stub.always(completion_top({" Yes": -0.3, " No": -1.5, " The": -3.0}))
    c = I.OpenAIClient(stub.url, "m", logprobs="completions")
    assert c.score_options([MSGS], ("Yes", "No")) == [[-0.3, -1.5]]
    r = stub.requests[-1]
    assert r["path"] == "/v1/completions"
    assert r["body"] == {"model": "m", "prompt": "System: Be brief.\n\nUser: Is this a cat?\n\nAssistant:",
                         "max_tokens": 1, "temperature": 0.0, "logprobs": 20}
    stub.script((200, {"choices": [{"text": "x"}]}))
    assert c.score_options([MSGS], ("Yes", "No")) == [None]


def test_option_scoring_semantics(stub):
    c = I.OpenAIClient(stub.url, "m")
    stub.script(
        chat_top({"Yes": -1.0, " yes": -2.0, "No": -0.5, "The": -4.0}),  # variants pooled by log-sum-exp
        chat_top({"Yes": -0.1, "A": -3.0, "The": -4.0}),  # "No" missing: the lowest listed value
        chat_top({"The": -1.0, "A": -2.0}),  # no option listed: None
        (200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}}]}),  # no log-probs
        chat_top({" NO ": -0.2, "Yes": -3.0}),  # a later prompt is still scored
    )
    got = c.score_options([MSGS] * 5, ("Yes", "No"))
    assert len(got) == 5
    assert got[0] == pytest.approx([math.log(math.exp(-1.0) + math.exp(-2.0)), -0.5])
    assert got[1] == [-0.1, -4.0]
    assert got[2] is None and got[3] is None
    assert got[4] == [-3.0, -0.2]
    assert c.n_requests == 5


def test_option_scoring_none_mode_sends_nothing(stub):
    c = I.OpenAIClient(stub.url, "m", logprobs="none")
    assert c.score_options([MSGS, MSGS, MSGS], ("Yes", "No")) == [None, None, None]
    assert c.score_options([], ("Yes", "No")) == []
    assert stub.requests == [] and c.n_requests == 0


# ----------------------------------------------------------------------------- retries and errors


@pytest.mark.parametrize("code", [408, 409, 429, 500, 502, 503, 504])
def test_retryable_statuses(stub, waits, code):
    stub.script((code, {"error": "try again"}))
    c = I.OpenAIClient(stub.url, "m", max_retries=2, backoff=0.5)
    assert c.chat(MSGS) == "Yes"
    assert c.n_requests == 2 and len(stub.requests) == 2 and waits == [0.5]


@pytest.mark.parametrize("code", [400, 401, 403, 404, 410, 422, 430, 499])
def test_other_client_errors_are_not_retried(stub, waits, code):
    stub.always((code, {"error": "no"}))
    c = I.OpenAIClient(stub.url, "m", max_retries=3)
    with pytest.raises(I.EndpointError) as e:
        c.chat(MSGS)
    assert str(e.value) == f'HTTP {code} from {stub.url}/chat/completions: {{"error": "no"}}'
    assert c.n_requests == 1 and len(stub.requests) == 1 and waits == []


def test_default_retries_and_backoff(stub, waits):
    stub.always((503, b"overloaded"))
    c = I.OpenAIClient(stub.url, "m")
    with pytest.raises(I.EndpointError) as e:
        c.chat(MSGS)
    assert str(e.value) == (f"HTTP 503 from {stub.url}/chat/completions: overloaded "
                            "(gave up after 5 attempts, timeout 60.0 s)")
    assert c.n_requests == 5 and waits == [1.0, 2.0, 4.0, 8.0]


def test_backoff_doubles_and_is_capped(stub, waits):
    stub.always((500, b"x"))
    with pytest.raises(I.EndpointError, match="gave up after 6 attempts"):
        I.OpenAIClient(stub.url, "m", max_retries=5, backoff=1, max_backoff=5).chat(MSGS)
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0]
    waits.clear()
    with pytest.raises(I.EndpointError):
        I.OpenAIClient(stub.url, "m", backoff=10).chat(MSGS)  # the default cap: 30 s
    assert waits == [10.0, 20.0, 30.0, 30.0]
    waits.clear()
    with pytest.raises(I.EndpointError):
        I.OpenAIClient(stub.url, "m", max_retries=3, backoff=0.25, max_backoff=100).chat(MSGS)
    assert waits == [0.25, 0.5, 1.0]


def test_error_body_is_truncated_and_decoded_leniently(stub, waits):
    c = I.OpenAIClient(stub.url, "m", max_retries=0)
    stub.script((400, b"a" * 299 + b"bcdef"))
    with pytest.raises(I.EndpointError) as e:
        c.chat(MSGS)
    assert str(e.value) == f"HTTP 400 from {stub.url}/chat/completions: " + "a" * 299 + "b"
    stub.script((400, b"bad \xff byte"))
    with pytest.raises(I.EndpointError) as e:
        c.chat(MSGS)
    assert str(e.value) == f"HTTP 400 from {stub.url}/chat/completions: bad \ufffd byte"


def test_error_messages_mask_the_key(stub, waits, monkeypatch):
    monkeypatch.setenv("WSAE_INTERP_API_KEY", "sk-topsecret")
    stub.always((401, b"invalid key sk-topsecret; Authorization: Bearer sk-topsecret"))
    with pytest.raises(I.EndpointError) as e:
        I.OpenAIClient(stub.url, "m").chat(MSGS)
    assert str(e.value) == f"HTTP 401 from {stub.url}/chat/completions: invalid key ***; Authorization: Bearer ***"
    stub.always((500, b"echo Bearer sk-topsecret"))
    with pytest.raises(I.EndpointError) as e:
        I.OpenAIClient(stub.url, "m", max_retries=1).chat(MSGS)
    assert "sk-topsecret" not in str(e.value) and "echo Bearer ***" in str(e.value)


def test_invalid_json_is_retried_then_reported(stub, waits):
    stub.always((200, b"not json {"))
    c = I.OpenAIClient(stub.url, "m", max_retries=2, backoff=0.1)
    with pytest.raises(I.EndpointError) as e:
        c.chat(MSGS)
    msg = str(e.value)
    assert msg.startswith(f"invalid JSON from {stub.url}/chat/completions: Expecting value")
    assert msg.endswith("(gave up after 3 attempts, timeout 60.0 s)")
    assert c.n_requests == 3 and waits == [0.1, 0.2]
    stub.script((200, b"{broken"), ok_chat())
    assert c.chat(MSGS) == "Yes"


def test_unreachable_endpoint_names_the_url_and_reason(waits):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    c = I.OpenAIClient(url, "m", timeout=2, max_retries=1)
    with pytest.raises(I.EndpointError) as e:
        c.chat(MSGS)
    assert c.n_requests == 2 and waits == [1.0]
    assert str(e.value) == (f"URLError on {url}/chat/completions: [Errno 111] Connection refused"
                            " (gave up after 2 attempts, timeout 2.0 s)")


def test_read_timeout_is_retried_and_reported(stub, waits):
    stub.always(HANG)
    c = I.OpenAIClient(stub.url, "m", timeout=0.1, max_retries=1)
    with pytest.raises(I.EndpointError) as e:
        c.chat(MSGS)
    assert str(e.value) == (f"TimeoutError on {stub.url}/chat/completions: timed out "
                            "(gave up after 2 attempts, timeout 0.1 s)")
    assert c.n_requests == 2 and len(stub.requests) == 2


# ----------------------------------------------------------------------------- the response cache


def key(obj) -> str:
    """The cache key format (the committed caches depend on it): the first 24 hex digits of the
    SHA-256 of the canonical JSON (sorted keys, ASCII) of ``[identity, kind, request]``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=True).encode()).hexdigest()[:24]


class Recorder(I.ChatClient):
    identity = "rec:model/v1"

    def __init__(self, scores=None):
        self.calls = []
        self.scores = scores or {}

    def chat(self, messages, *, max_tokens=48):
        self.calls.append(("chat", messages, max_tokens))
        return f"reply {max_tokens}"

    def score_options(self, prompts, options):
        self.calls.append(("options", list(prompts), list(options)))
        return [self.scores.get(p[-1]["content"]) for p in prompts]


def lines(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_cached_chat_entry_key_and_parameters(tmp_path):
    inner = Recorder()
    c = I.CachedClient(inner, tmp_path)
    assert c.path == tmp_path / "rec_model_v1.jsonl"
    assert c.chat(MSGS) == "reply 48"
    assert c.chat(MSGS, max_tokens=7) == "reply 7"
    assert inner.calls == [("chat", MSGS, 48), ("chat", MSGS, 7)]
    k48 = key(["rec:model/v1", "chat", {"messages": MSGS, "max_tokens": 48}])
    k7 = key(["rec:model/v1", "chat", {"messages": MSGS, "max_tokens": 7}])
    assert lines(c.path) == [
        {"key": k48, "kind": "chat", "request": {"messages": MSGS, "max_tokens": 48}, "response": "reply 48"},
        {"key": k7, "kind": "chat", "request": {"messages": MSGS, "max_tokens": 7}, "response": "reply 7"},
    ]
    assert (c.hits, c.misses) == (0, 2)
    assert c.chat(MSGS, max_tokens=7) == "reply 7" and (c.hits, c.misses) == (1, 2) and len(inner.calls) == 2


def test_cached_chat_without_prompts_and_miss_names_the_key(tmp_path):
    c = I.CachedClient(Recorder(), tmp_path, store_prompts=False)
    c.chat(MSGS, max_tokens=3)
    k = key(["rec:model/v1", "chat", {"messages": MSGS, "max_tokens": 3}])
    assert lines(c.path) == [{"key": k, "kind": "chat", "request": None, "response": "reply 3"}]
    strict = I.CachedClient(Recorder(), tmp_path / "empty", allow_miss=False)
    with pytest.raises(I.CacheMiss) as e:
        strict.chat(MSGS, max_tokens=3)
    assert f"request {k} is not in the cache" in str(e.value)


def test_cached_options_entries_rounding_and_keys(tmp_path):
    p1 = [{"role": "user", "content": "one"}]
    p2 = [{"role": "user", "content": "two"}]
    inner = Recorder({"one": [-0.123456, -2.0000049], "two": None})
    c = I.CachedClient(inner, tmp_path)
    assert c.score_options([p1, p2], ("Yes", "No")) == [[-0.1235, -2.0], None]
    req1, req2 = ({"messages": p, "options": ["Yes", "No"]} for p in (p1, p2))
    k1, k2 = key(["rec:model/v1", "options", req1]), key(["rec:model/v1", "options", req2])
    assert lines(c.path) == [
        {"key": k1, "kind": "options", "request": req1, "response": {"logprobs": [-0.1235, -2.0]}},
        {"key": k2, "kind": "options", "request": req2, "response": {"logprobs": None}},
    ]
    assert (c.hits, c.misses) == (0, 2)
    # A replay: same numbers, from the file, without the model.
    again = I.CachedClient(inner, tmp_path, allow_miss=False)
    assert again.score_options([p2, p1], ["Yes", "No"]) == [None, [-0.1235, -2.0]]
    assert (again.hits, again.misses) == (2, 0) and len(inner.calls) == 1
    # A chat request and an options request on the same messages have different keys.
    c.chat(p1, max_tokens=1)
    assert len({e["key"] for e in lines(c.path)}) == 3


def test_cached_options_without_prompts_and_miss_names_the_key(tmp_path):
    p = [{"role": "user", "content": "one"}]
    c = I.CachedClient(Recorder({"one": [-1.0, -3.25]}), tmp_path, store_prompts=False)
    assert c.score_options([p], ["A", "B"]) == [[-1.0, -3.25]]
    k = key(["rec:model/v1", "options", {"messages": p, "options": ["A", "B"]}])
    assert lines(c.path) == [{"key": k, "kind": "options", "request": None, "response": {"logprobs": [-1.0, -3.25]}}]
    strict = I.CachedClient(Recorder(), tmp_path, allow_miss=False)
    q = [{"role": "user", "content": "two"}]
    kq = key(["rec:model/v1", "options", {"messages": q, "options": ["A", "B"]}])
    with pytest.raises(I.CacheMiss) as e:
        strict.score_options([p, q], ["A", "B"])
    assert f"request {kq} is not in the cache" in str(e.value)


# ----------------------------------------------------------------------------- keyword client, cache folder


def test_keyword_client_scores_and_counts():
    c = I.KeywordClient()
    c.chat(I.detection_messages('the words "cat"', "a dog"))
    assert c.n_calls == 1
    yes = I.detection_messages('the words "cat"', "the cat sat")
    no = I.detection_messages('the words "cat"', "a dog ran")
    got = c.score_options([yes, no], ("Yes", "No", "Maybe"))
    assert got == [[math.log(0.9), math.log(0.1), math.log(0.1)], [math.log(0.1), math.log(0.9), math.log(0.9)]]
    assert c.n_calls == 3
    c.score_options([yes], ("Yes", "No"))
    assert c.n_calls == 4


def test_default_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WSAE_INTERP_CACHE", str(tmp_path / "env"))
    assert I.default_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("WSAE_INTERP_CACHE")
    # A checkout: <repo>/wsae_core/interp.py next to <repo>/book.
    repo = tmp_path / "outer" / "repo"
    (repo / "wsae_core").mkdir(parents=True)
    (repo / "book").mkdir()
    monkeypatch.setattr(I, "__file__", str(repo / "wsae_core" / "interp.py"))
    assert I.default_cache_dir() == repo / "book" / "results" / "interp_cache"
    # An installed package (no book folder next to it): the user's cache.
    (repo / "book").rmdir()
    (tmp_path / "outer" / "book").mkdir()  # a book folder further up does not count
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert I.default_cache_dir() == tmp_path / "home" / ".cache" / "wsae_core" / "interp_cache"
