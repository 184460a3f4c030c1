"""Faults injected into real runs: SIGKILL of a real subprocess while it builds the activation cache,
while it trains and at four points inside a checkpoint write; truncated, altered and crafted files;
a full disk (a writer patched to raise ENOSPC, and a real 1 MiB tmpfs where the machine allows a
mount). After each fault, rerunning the same command finishes, redoes only what was unfinished and
ends bitwise equal to an uninterrupted run; nothing corrupt is ever read.

Count of faults: ``pytest tests -m fault --collect-only -q`` (one collected case each).
"""

import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from wsae_core import activations as A
from wsae_core import checks, data, geometry, models, train
from wsae_core import corpus as C
from wsae_core import lm as L

pytestmark = pytest.mark.fault

W_P = geometry.superposition_matrix([1, 2, 3])
TIMEOUT = 240  # seconds for one child run on a loaded 2-core machine

# ------------------------------------------------------------------------------------ child scripts

# Trains a Top-k SAE with checkpoints every 5 steps; resumes from the checkpoint when there is one
# (the same command finishes an interrupted run). argv: checkpoint folder, output folder.
# WSAE_SLOW=1 sleeps in every step (so that the parent can kill mid-run); WSAE_FAULT=kind:n kills the
# process with SIGKILL inside the n-th checkpoint write (kind: model-half, state-half, pointer, cleanup).
TRAIN_CHILD = textwrap.dedent('''
    import json, os, signal, sys, time
    from pathlib import Path
    import torch
    from wsae_core import checks, data, geometry, models, train

    ck, out = Path(sys.argv[1]), Path(sys.argv[2])
    W_p = geometry.superposition_matrix([1, 2, 3])

    class Source:
        n_p = 4
        def __init__(self):
            self.inner = data.SparseSource(W_p, 0.7)
        def sample(self, batch, generator):
            if os.environ.get("WSAE_SLOW"):
                time.sleep(0.05)
            return self.inner.sample(batch, generator)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    fault = os.environ.get("WSAE_FAULT")
    if fault:
        kind, n = fault.split(":")
        n, seen = int(n), {"ckpt": 0}
        real_save, real_bytes, real_json = train.Trainer.save_checkpoint, train.write_bytes, train.write_json
        def counting_save(self, path):
            seen["ckpt"] += 1
            return real_save(self, path)
        def half_then_die(path, data_):
            if seen["ckpt"] == n and Path(path).name == kind.split("-")[0] + ".safetensors":
                with open(Path(path).with_name("." + Path(path).name + ".tmp-" + str(os.getpid())), "wb") as f:
                    f.write(data_[: len(data_) // 2]); f.flush(); os.fsync(f.fileno())
                die()
            return real_bytes(path, data_)
        def json_then_die(path, obj):
            if seen["ckpt"] == n and kind == "pointer" and Path(path).name == "checkpoint.json":
                die()
            entry = real_json(path, obj)
            if seen["ckpt"] == n and kind == "cleanup" and Path(path).name == "checkpoint.json":
                die()  # committed, superseded step folder not yet deleted
            return entry
        train.Trainer.save_checkpoint = counting_save
        train.write_bytes, train.write_json = half_then_die, json_then_die

    cfg = train.TrainConfig(steps=30, batch_size=32, lr=1e-2, warmup_steps=3, seed=7, log_every=5, progress=False,
                            threads=1, checkpoint_every=5, checkpoint_dir=str(ck))
    if (ck / "checkpoint.json").is_file():
        t = train.Trainer.from_checkpoint(ck, Source())
        print("resumed at step", t.step, flush=True)
    else:
        sae = models.build_sae(models.SAEConfig(n_p=4, n_m=8, kind="topk", k=2, seed=3))
        t = train.Trainer(sae, Source(), cfg, gamma=torch.tensor([1.0, 0.7, 0.7, 1.2]))
        print("started", flush=True)
    t.fit()
    train.save_sae(t.model, out, extra={"history": t.history})
    print("done", flush=True)
''')

# Builds an activation cache of a tiny GPT-NeoX: 12 shards of 4 contexts. argv: model folder, cache
# root. WSAE_SLOW=1 sleeps in every forward pass.
CACHE_CHILD = textwrap.dedent('''
    import json, os, sys, time
    from wsae_core import activations as A, corpus as C, lm as L

    model_dir, root = sys.argv[1], sys.argv[2]
    lm = L.load_lm(model_dir)
    docs = C.wiki_documents()[:300]
    ctx = C.tokenize_contexts(docs, lm.tokenizer, context_len=16, n_contexts=48, seed=0, source="wiki")
    if os.environ.get("WSAE_SLOW"):
        real = A.capture_residuals
        def slow(*a, **k):
            time.sleep(0.25)
            return real(*a, **k)
        A.capture_residuals = slow
    cache = A.build_activation_cache(lm, ctx, [0, 2], root=root, shard_contexts=4, batch_size=2, verbose=True)
    print(json.dumps({"tokens_computed": cache.meta["tokens_computed"], "folder": str(cache.folder)}), flush=True)
''')


def _run(script, *args, env=None, check=True):
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT, env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _kill_when(script, args, ready, env):
    """Start the child, SIGKILL it as soon as ``ready()`` holds; returns its exit code."""
    proc = subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, **env})
    t0 = time.monotonic()
    try:
        while not ready():
            assert proc.poll() is None, "child finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
            assert time.monotonic() - t0 < TIMEOUT, "child never reached the kill point"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    d = tmp_path_factory.mktemp("children")
    (d / "train_child.py").write_text(TRAIN_CHILD)
    (d / "cache_child.py").write_text(CACHE_CHILD)
    return d


@pytest.fixture(scope="module")
def reference_training(scripts, tmp_path_factory):
    """The uninterrupted run: weights and history the interrupted ones must end with."""
    d = tmp_path_factory.mktemp("ref_train")
    _run(scripts / "train_child.py", d / "ck", d / "out")
    return load_file(str(d / "out" / "model.safetensors")), json.loads((d / "out" / "cfg.json").read_text())["history"]


def _assert_same_as_reference(out, reference):
    weights, history = reference
    got = load_file(str(out / "model.safetensors"))
    assert got.keys() == weights.keys()
    for k in weights:
        assert torch.equal(got[k], weights[k]), k  # bitwise
    assert json.loads((out / "cfg.json").read_text())["history"] == history


def _checkpoint_step(ck):
    try:
        return json.loads((ck / "checkpoint.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


# ------------------------------------------------------------------------------------ training


def test_sigkill_while_training_then_rerun_finishes_equal(scripts, reference_training, tmp_path):
    ck, out = tmp_path / "ck", tmp_path / "out"
    code = _kill_when(scripts / "train_child.py", [ck, out], lambda: _checkpoint_step(ck) >= 15, {"WSAE_SLOW": "1"})
    assert code == -signal.SIGKILL
    killed_at = _checkpoint_step(ck)
    assert 15 <= killed_at < 30 and not out.exists()
    proc = _run(scripts / "train_child.py", ck, out)
    assert f"resumed at step {killed_at}" in proc.stdout  # only the unfinished steps are redone
    _assert_same_as_reference(out, reference_training)


@pytest.mark.parametrize("fault, survivor", [
    ("model-half", 5),  # killed half-way through model.safetensors of the step-10 checkpoint
    ("state-half", 5),  # ... half-way through state.safetensors
    ("pointer", 5),     # ... with the step folder complete but checkpoint.json not yet replaced
    ("cleanup", 10),    # ... after the commit, before the step-5 folder was deleted
])
def test_sigkill_inside_a_checkpoint_write(scripts, reference_training, tmp_path, fault, survivor):
    ck, out = tmp_path / "ck", tmp_path / "out"
    proc = _run(scripts / "train_child.py", ck, out, env={"WSAE_FAULT": f"{fault}:2"}, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # The last committed checkpoint is intact and loads (every file checked against its manifest).
    back = train.Trainer.from_checkpoint(ck, data.SparseSource(W_P, 0.7))
    assert back.step == survivor
    proc = _run(scripts / "train_child.py", ck, out)
    assert f"resumed at step {survivor}" in proc.stdout
    _assert_same_as_reference(out, reference_training)
    # Leftovers of the killed write (half files, superseded step folders) are gone after the next save.
    assert sorted(p.name for p in ck.iterdir() if not p.name.startswith("step_")) == ["checkpoint.json"]
    assert len([p for p in ck.iterdir() if p.name.startswith("step_")]) == 1


def test_truncated_or_altered_checkpoint_is_refused_not_read(tmp_path):
    cfg = train.TrainConfig(steps=10, batch_size=16, warmup_steps=1, progress=False, checkpoint_every=10,
                            checkpoint_dir=str(tmp_path / "ck"))
    train.Trainer(models.build_sae(models.SAEConfig(n_p=4, n_m=8)), data.SparseSource(W_P, 0.5), cfg).fit()
    folder = train._resolve_checkpoint(tmp_path / "ck")
    for name in ("model.safetensors", "state.safetensors", "state.json"):
        good = (folder / name).read_bytes()
        (folder / name).write_bytes(good[:-7])
        with pytest.raises(checks.CorruptFileError, match=rf"{name} has [\d,]+ bytes, the manifest says"):
            train.Trainer.from_checkpoint(tmp_path / "ck", data.SparseSource(W_P, 0.5))
        (folder / name).write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
        with pytest.raises(checks.CorruptFileError, match=rf"{name} does not match its SHA-256"):
            train.Trainer.from_checkpoint(tmp_path / "ck", data.SparseSource(W_P, 0.5))
        (folder / name).write_bytes(good)
    assert train.Trainer.from_checkpoint(tmp_path / "ck", data.SparseSource(W_P, 0.5)).step == 10


# ------------------------------------------------------------------------------------ crafted pickles


class _Payload:
    """Unpickling this creates ``marker``: stands for arbitrary code run by a loader."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _checkpoint(tmp):
    cfg = train.TrainConfig(steps=4, batch_size=16, warmup_steps=1, progress=False, checkpoint_every=4,
                            checkpoint_dir=str(tmp / "ck"))
    train.Trainer(models.build_sae(models.SAEConfig(n_p=4, n_m=8)), data.SparseSource(W_P, 0.5), cfg).fit()
    return tmp / "ck", train._resolve_checkpoint(tmp / "ck")


def test_crafted_pickle_is_live(tmp_path):
    """The payload really runs code when a pickle loader reads it, so the refusals below mean something."""
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "x": _Payload(marker)}, tmp_path / "state.pt")
    torch.load(tmp_path / "state.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("where", ["state.pt", "state.safetensors", "model.safetensors", "checkpoint.json"])
def test_crafted_pickle_in_a_checkpoint_is_refused_and_never_run(tmp_path, where):
    marker = tmp_path / "pwned"
    ck, folder = _checkpoint(tmp_path)
    blob = pickle.dumps({"step": 4, "payload": _Payload(marker)})
    if where == "state.pt":  # the old format, as a torch.save zip holding the pickle
        torch.save({"step": 4, "payload": _Payload(marker)}, ck / "state.pt")
        match = "is a pickle .* never read here"
    elif where == "checkpoint.json":
        (ck / where).write_bytes(blob)
        match = "not valid JSON"
    else:  # the pickle in place of a tensor file, its manifest entry updated to match
        (folder / where).write_bytes(blob)
        cfg = json.loads((folder / "cfg.json").read_text())
        cfg["files"][where] = checks.file_entry(folder / where)
        (folder / "cfg.json").write_text(json.dumps(cfg))
        match = "is not a valid safetensors file"
    with pytest.raises(checks.CorruptFileError, match=match):
        train.Trainer.from_checkpoint(ck, data.SparseSource(W_P, 0.5))
    if where != "state.safetensors":
        with pytest.raises(checks.CorruptFileError):
            train.load_sae(ck)
    assert not marker.exists()


def test_crafted_object_array_in_a_cache_shard_is_refused(tiny, contexts, tmp_path):
    marker = tmp_path / "pwned"
    cache = A.build_activation_cache(tiny, contexts, [1], root=tmp_path, shard_contexts=16)
    shard = cache.folder / "shard_00000"
    np.save(shard / "tokens.npy", np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    man = json.loads((shard / "manifest.json").read_text())
    man["files"]["tokens.npy"] = checks.file_entry(shard / "tokens.npy")
    (shard / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="allow_pickle"):
        A.ActivationCache(cache.folder)
    assert not marker.exists()


# ------------------------------------------------------------------------------------ activation cache


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    docs = C.wiki_documents()[:200]
    return L.make_tiny_gpt_neox(tmp_path_factory.mktemp("neox"), [d.text for d in docs], n_layers=3, d_model=32)


@pytest.fixture(scope="module")
def tiny(model_dir):
    return L.load_lm(model_dir)


@pytest.fixture(scope="module")
def contexts(tiny):
    return C.tokenize_contexts(C.wiki_documents()[:300], tiny.tokenizer, context_len=24, n_contexts=40, seed=0,
                               source="wiki")


def _layer_arrays(folder):
    cache = A.ActivationCache(folder)
    return {l: cache.activations(l) for l in cache.layers}, cache


def test_sigkill_while_building_the_cache_then_rerun_finishes_equal(scripts, model_dir, tmp_path):
    ref = _run(scripts / "cache_child.py", model_dir, tmp_path / "ref")
    ref_info = json.loads(ref.stdout.strip().splitlines()[-1])
    root = tmp_path / "killed"
    shards = lambda: sorted((root / "activations").glob("*/shard_?????"))  # noqa: E731
    code = _kill_when(scripts / "cache_child.py", [model_dir, root], lambda: len(shards()) >= 3, {"WSAE_SLOW": "1"})
    assert code == -signal.SIGKILL
    done = shards()
    assert 3 <= len(done) < 12
    before = {p.name: {f.name: f.stat().st_mtime_ns for f in p.iterdir()} for p in done}
    info = json.loads(_run(scripts / "cache_child.py", model_dir, root).stdout.strip().splitlines()[-1])
    assert info["tokens_computed"] == (12 - len(done)) * 4 * 16  # only the unfinished shards were computed
    after = {p.name: {f.name: f.stat().st_mtime_ns for f in p.iterdir()} for p in shards() if p.name in before}
    assert after == before  # the shards finished before the kill were not rewritten
    got, cache = _layer_arrays(info["folder"])
    want, _ = _layer_arrays(ref_info["folder"])
    for l in want:
        assert torch.equal(got[l], want[l]), l
    np.testing.assert_array_equal(cache.tokens, A.ActivationCache(ref_info["folder"]).tokens)
    assert not list(Path(info["folder"]).glob("*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_shard_is_refused_then_rebuilt(tiny, contexts, tmp_path, capture_calls, damage):
    cache = A.build_activation_cache(tiny, contexts, [0, 2], root=tmp_path, shard_contexts=16, batch_size=8)
    want = {l: cache.activations(l) for l in (0, 2)}
    target = cache.folder / "shard_00001" / "layer_2.npy"
    good = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(good[: len(good) // 3])
        match = r"layer_2.npy has [\d,]+ bytes, the manifest says"
    elif damage == "flip":
        target.write_bytes(good[:-5] + bytes([good[-5] ^ 0x40]) + good[-4:])
        match = r"layer_2.npy does not match its SHA-256"
    else:
        target.unlink()
        match = r"layer_2.npy is missing"
    with pytest.raises(checks.CorruptFileError, match=match):
        A.ActivationCache(cache.folder).activations(2)  # refused, never read silently
    capture_calls["n"] = 0
    again = A.build_activation_cache(tiny, contexts, [0, 2], root=tmp_path, shard_contexts=16, batch_size=8)
    assert capture_calls["n"] == 2 and again.meta["tokens_computed"] == 16 * 24  # only shard 1 was rebuilt
    for l in (0, 2):
        assert torch.equal(A.ActivationCache(again.folder).activations(l), want[l])


def test_nan_from_the_model_is_caught_where_it_enters(tiny, contexts, tmp_path, monkeypatch):
    real = A.capture_residuals
    calls = {"n": 0}

    def poisoned(lm, ids, layers, **k):
        out = real(lm, ids, layers, **k)
        calls["n"] += 1
        if calls["n"] == 6:  # batches of 4 contexts: the sixth holds contexts 20-23
            out[2] = out[2].clone()
            out[2][1, 5, 7] = float("nan")
        return out

    monkeypatch.setattr(A, "capture_residuals", poisoned)
    with pytest.raises(checks.NonFiniteError, match=r"produced nan in the residual stream after block 2 at context 21, "
                                                    r"position 5, dimension 7 \(shard 1\)"):
        A.build_activation_cache(tiny, contexts, [0, 2], root=tmp_path, shard_contexts=16, batch_size=4)
    folder = next((tmp_path / "activations").iterdir())
    assert [p.name for p in sorted(folder.glob("shard_*"))] == ["shard_00000"]  # the shard before it is kept
    monkeypatch.setattr(A, "capture_residuals", real)
    cache = A.build_activation_cache(tiny, contexts, [0, 2], root=tmp_path, shard_contexts=16, batch_size=4)
    assert cache.meta["tokens_computed"] == 24 * 24


def test_nan_in_a_cache_file_is_caught_with_its_row(tiny, contexts, tmp_path):
    cache = A.build_activation_cache(tiny, contexts, [1], root=tmp_path, shard_contexts=16)
    shard = cache.folder / "shard_00001"
    arr = np.load(shard / "layer_1.npy")
    arr[30, 4] = np.inf
    np.save(shard / "layer_1.npy", arr)
    man = json.loads((shard / "manifest.json").read_text())
    man["files"]["layer_1.npy"] = checks.file_entry(shard / "layer_1.npy")  # a consistent manifest
    (shard / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(checks.NonFiniteError, match=r"layer_1.npy holds inf at row 30 \(context 17, position 6, dimension 4\)"):
        A.ActivationCache(cache.folder).activations(1)


# ------------------------------------------------------------------------------------ full disk


class _SmallDisk:
    """Stands in for ``open`` in :mod:`wsae_core.checks`: writes fail with ENOSPC past ``budget`` bytes."""

    def __init__(self, budget):
        self.budget = budget

    def __call__(self, path, mode="r", *a, **k):
        f = open(path, mode, *a, **k)
        if "w" not in mode:
            return f
        disk, real_write = self, f.write

        def write(b):
            if len(b) > disk.budget:
                real_write(b[: disk.budget])
                disk.budget = 0
                raise OSError(errno.ENOSPC, "No space left on device")
            disk.budget -= len(b)
            return real_write(b)

        f.write = write
        return f


def test_full_disk_while_checkpointing_loses_nothing(tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    cfg = train.TrainConfig(steps=20, batch_size=16, warmup_steps=1, progress=False, checkpoint_every=5, checkpoint_dir=str(ck))
    t = train.Trainer(models.build_sae(models.SAEConfig(n_p=4, n_m=8, kind="topk", k=2)), data.SparseSource(W_P, 0.5), cfg)
    t.fit(until=5)
    before = {p.relative_to(ck): p.read_bytes() for p in ck.rglob("*") if p.is_file()}
    monkeypatch.setattr(checks, "open", _SmallDisk(200), raising=False)
    with pytest.raises(OSError, match=r"no space left on the device while writing .*files written before it are unchanged") as err:
        t.fit()
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    after = {p.relative_to(ck): p.read_bytes() for p in ck.rglob("*") if p.is_file()}
    assert after == before  # the step-5 checkpoint untouched, the half-written step-10 one removed
    back = train.Trainer.from_checkpoint(ck, data.SparseSource(W_P, 0.5))
    assert back.step == 5
    back.fit()  # with space again, the run finishes
    assert back.step == 20


def test_full_disk_while_building_the_cache_keeps_the_shards(tiny, contexts, tmp_path, monkeypatch):
    ref = A.build_activation_cache(tiny, contexts, [1], root=tmp_path / "ref", shard_contexts=8)
    shard_bytes = sum(f.stat().st_size for f in (ref.folder / "shard_00000").iterdir())
    meta_bytes = (ref.folder / "meta.json").stat().st_size  # written once before the shards
    monkeypatch.setattr(checks, "open", _SmallDisk(meta_bytes + int(2.5 * shard_bytes)), raising=False)
    with pytest.raises(OSError, match=r"no space left on the device while writing shard 3/5 of the activation cache "
                                      r".*complete shards are kept") as err:
        A.build_activation_cache(tiny, contexts, [1], root=tmp_path / "full", shard_contexts=8)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    folder = next((tmp_path / "full" / "activations").iterdir())
    assert sorted(p.name for p in folder.glob("shard_*")) == ["shard_00000", "shard_00001"]
    cache = A.build_activation_cache(tiny, contexts, [1], root=tmp_path / "full", shard_contexts=8)
    assert cache.meta["tokens_computed"] == 3 * 8 * 24
    assert torch.equal(cache.activations(1), ref.activations(1))


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MiB tmpfs (needs root and permission to mount; skipped elsewhere)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_real_full_disk_while_checkpointing(tiny_disk):
    # One checkpoint of this SAE is ~0.6 MiB: the second cannot fit beside the first on 1 MiB.
    ck = tiny_disk / "ck"
    cfg = train.TrainConfig(steps=6, batch_size=16, warmup_steps=1, progress=False, checkpoint_every=3, checkpoint_dir=str(ck))
    src = data.TensorSource(torch.randn(256, 64, generator=torch.Generator().manual_seed(0)))
    t = train.Trainer(models.build_sae(models.SAEConfig(n_p=64, n_m=400, kind="topk", k=8)), src, cfg)
    with pytest.raises(OSError, match="no space left on the device while writing") as err:
        t.fit()
    assert err.value.errno == errno.ENOSPC and t.step == 6
    back = train.Trainer.from_checkpoint(ck, src)
    assert back.step == 3  # the first checkpoint survived the failed second one intact
    assert [p.name for p in ck.iterdir() if p.name.startswith("step_")] == [train._resolve_checkpoint(ck).name]
