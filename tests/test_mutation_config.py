"""The mutation-testing set-up (``make mutation``, CONTRIBUTING.md "Mutation testing") runs every
unit-test file that exercises a mutated module, except those listed here with the reason: a test
file outside mutmut's selection silently leaves its kills uncounted (a round of survivors of
``choose_precision`` turned out to be killed by ``tests/test_precision.py``, then unselected)."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Test files that use a mutated module but are not run per mutant, and why. Their mutants are
#: re-checked with ``tools/mutation_recheck.py`` where they matter (CONTRIBUTING.md).
NOT_SELECTED = {
    "tests/test_cli.py": "the command line's help and argument handling (some in subprocesses), not the mutated maths",
    "tests/test_distributed.py": "starts process groups (5-20 s per test); the AuxK all-reduce mutants are re-checked against it",
    "tests/test_faults.py": "kills and restarts subprocesses (5-15 s per test): crash safety, not values",
    "tests/test_interop.py": "needs the test extra (SAELens, sparsify): conversions, not the mutated maths",
    "tests/test_stacked.py": "the stacked trainer (wsae_core.stacked, not mutated) against Trainer runs",
    "tests/test_widgets.py": "the notebook widgets (wsae_core.widgets, not mutated)",
}


def _config():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]


def _mutated_modules_used(path: Path, modules: set[str]) -> set[str]:
    text = path.read_text()
    used = set(re.findall(r"wsae_core\.(\w+)", text))
    for names in re.findall(r"from wsae_core import (\([^)]*\)|[^\n]+)", text):
        used |= {n.strip().split(" as ")[0] for n in names.strip("()").replace("\n", " ").split(",")}
    return used & modules


def test_every_unit_test_file_of_a_mutated_module_is_selected_or_excused():
    cfg = _config()
    selected = set(cfg["pytest_add_cli_args_test_selection"])
    modules = {Path(p).stem for p in cfg["only_mutate"]}
    assert all((ROOT / f).is_file() for f in selected), sorted(f for f in selected if not (ROOT / f).is_file())
    missing = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                     if _mutated_modules_used(p, modules) and str(p.relative_to(ROOT)) not in selected
                     and str(p.relative_to(ROOT)) not in NOT_SELECTED)
    assert not missing, f"add to [tool.mutmut] pytest_add_cli_args_test_selection or to NOT_SELECTED: {missing}"
    assert not selected & set(NOT_SELECTED), sorted(selected & set(NOT_SELECTED))
    assert all((ROOT / f).is_file() for f in NOT_SELECTED)


def test_files_the_selected_tests_read_are_copied():
    """mutmut runs the tests in a copy (``mutants/``) holding the package and ``also_copy``: the
    committed results and the latent browser's data that selected tests read."""
    copied = _config()["also_copy"]
    for path in ("book/results", "book/browser_assets"):
        assert path in copied and (ROOT / path).is_dir(), path
