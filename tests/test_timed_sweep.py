"""``tools/timed_sweep.py``: the timed language-model sweep the book's committed runs are made with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = [sys.executable, str(ROOT / "tools" / "timed_sweep.py")]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TOOL, *args], capture_output=True, text=True, cwd=ROOT)


def test_refuses_a_cache_root_that_is_not_empty_unless_resumed(tmp_path):
    (tmp_path / "old").write_text("x")
    res = _run("--profile", "ci", "--cache-root", str(tmp_path), "--out", str(tmp_path / "o.json"))
    assert res.returncode != 0 and f"--cache-root {tmp_path} is not empty" in res.stderr and "--resume" in res.stderr


@pytest.mark.parametrize("option", ["--cells", "--out", "--cache-root", "--profile", "--list", "--collect"])
def test_refuses_sweep_options_that_are_its_own(tmp_path, option):
    res = _run("--profile", "ci", "--cache-root", str(tmp_path / "c"), "--out", str(tmp_path / "o.json"), "--", "--full", option, "x")
    assert res.returncode != 0 and f"{option}: set by this tool" in res.stderr
    assert not (tmp_path / "c").exists()


def test_passes_sweep_options_through_and_resumes(tmp_path):
    """Options after ``--`` choose the sweep (here one layer, one rule, one seed of the ci sweep);
    the result names no path of this machine; ``--resume`` reuses the finished cell."""
    root, out = tmp_path / "cache", tmp_path / "run.json"
    res = _run("--profile", "ci", "--processes", "1", "--cache-root", str(root), "--out", str(out),
               "--", "--layers", "1", "--methods", "SAE", "--seeds", "0")
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["spec"]["layers"] == [1] and got["spec"]["methods"] == ["SAE"] and got["spec"]["seeds"] == [0]
    assert [r["cell"] for r in got["records"]] == ["L01-uniform-s0"] and not got["missing"]
    assert got["wall_seconds"]["layers_per_process"] == [[1]] and "resumed" not in got["wall_seconds"]
    assert not Path(got["records"][0]["sae_dir"]).is_absolute() and str(tmp_path) not in out.read_text()
    again = _run("--profile", "ci", "--processes", "1", "--resume", "--cache-root", str(root), "--out", str(out),
                 "--", "--layers", "1", "--methods", "SAE", "--seeds", "0")
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads(out.read_text())
    assert resumed["wall_seconds"]["resumed"] is True
    assert resumed["records"][0]["fvu"] == got["records"][0]["fvu"] and resumed["records"][0]["seconds"] == got["records"][0]["seconds"]
