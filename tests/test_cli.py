"""The command line: ``python -m wsae_core`` lists and dispatches every experiment and tool;
``python -m wsae_core.experiments`` keeps working; export and import round-trip an SAE."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from wsae_core import interop as X
from wsae_core.__main__ import COMMANDS, main
from wsae_core.models import SAEConfig, build_sae
from wsae_core.train import save_sae

EXPECTED = {"synthetic", "theory", "lm", "interp", "export", "import", "browser", "benchmark"}


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "wsae_core", "--help"], capture_output=True, text=True, check=True).stdout
    assert set(COMMANDS) == EXPECTED
    for name in EXPECTED:
        assert f"\n  {name} " in out, name
    for option in ("--profile", "--device", "--out"):
        assert option in out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_command_has_help(name, capsys):
    try:
        rc = main([name, "--help"])
    except SystemExit as e:  # argparse's --help
        rc = e.code
    assert rc == 0
    assert "usage:" in capsys.readouterr().out


def test_unknown_command_is_named(capsys):
    assert main(["sweep"]) == 2
    assert "unknown command 'sweep'" in capsys.readouterr().err


def test_experiments_entry_point_still_works():
    res = subprocess.run([sys.executable, "-m", "wsae_core.experiments", "theory", "--help"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "--profile" in res.stdout


def test_export_then_import_round_trip(tmp_path, capsys):
    m = build_sae(SAEConfig(n_p=8, n_m=32, kind="topk", k=3, seed=1))
    gamma = torch.linspace(0.5, 1.5, 8)
    save_sae(m, tmp_path / "sweep" / "layer_2" / "WSAE_α1", extra={
        "layer": 2, "model": "smollm2-135m-instruct", "method": "WSAE α=1", "scale": 2.5, "gamma": gamma.tolist()})
    src = tmp_path / "sweep" / "layer_2" / "WSAE_α1"
    assert main(["export", str(src), "--format", "sparsify", "--out", str(tmp_path / "sp")]) == 0
    folder = tmp_path / "sp" / "WSAE_alpha1" / "layers.2"
    assert json.loads((folder / "cfg.json").read_text())["wsae"]["model_name"] == "smollm2-135m-instruct"
    assert main(["export", str(src), "--format", "saelens", "--out", str(tmp_path / "sl")]) == 0
    lens = tmp_path / "sl" / "WSAE_alpha1" / "blocks.2.hook_resid_post"
    assert main(["import", str(lens), str(folder), "--out", str(tmp_path / "back")]) == 0
    out = capsys.readouterr().out
    assert "(saelens)" in out and "(sparsify)" in out and "scale 2.5" in out and "Γ yes" in out
    for name in (lens.name, folder.name):
        back = X.load(tmp_path / "back" / name)
        assert back.scale == 2.5 and torch.equal(back.gamma, gamma) and back.meta["layer"] == 2
        assert torch.equal(back.model.W_enc, m.W_enc) and back.model.cfg.k == 3
