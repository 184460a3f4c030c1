"""The GitHub Actions workflow that tests the project and publishes the book.

``actionlint`` (from the test extra, ``requirements-test.txt``; it runs offline) checks syntax,
expressions, job dependencies and action versions; the other tests check what the workflow must do:
run the README's test command, build and publish ``_build/html`` to Pages from the main branch only,
with the Pages permissions, and give the build the repository URL for the launch buttons.
Without actionlint the lint is skipped, unless ``WSAE_REQUIRE_TEST_EXTRA`` is set (``make test``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
BOOK = ROOT / ".github" / "workflows" / "book.yml"


def _actionlint() -> str:
    exe = shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which("actionlint")
    if exe is None:
        if os.environ.get("WSAE_REQUIRE_TEST_EXTRA"):
            raise RuntimeError("WSAE_REQUIRE_TEST_EXTRA is set but actionlint is missing "
                               "(pip install -r requirements-test.txt)")
        pytest.skip("actionlint not installed (pip install -r requirements-test.txt)")
    return exe


def _lint(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_actionlint(), "-no-color"], cwd=folder, capture_output=True, text=True, timeout=120)


def test_workflows_pass_actionlint():
    assert WORKFLOWS, "no workflow under .github/workflows"
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    bad = tmp_path / ".github" / "workflows"
    bad.mkdir(parents=True)
    text = BOOK.read_text().replace("${{ github.repository }}", "${{ github.repositorry }}")
    (bad / "book.yml").write_text(text)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    res = _lint(tmp_path)
    assert res.returncode != 0 and "repositorry" in res.stdout


@pytest.fixture(scope="module")
def book():
    # PyYAML reads the key `on` as True (YAML 1.1).
    return yaml.safe_load(BOOK.read_text())


def _steps(job):
    return [(s.get("uses") or "", s.get("run") or "", s.get("if") or "", s.get("with") or {}) for s in job["steps"]]


def test_runs_the_readme_test_command(book):
    assert "make test" in (ROOT / "README.md").read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    events = book[True]
    assert "pull_request" in events and events["push"]["branches"] == ["main"]
    runs = [r for _, r, _, _ in _steps(book["jobs"]["test"])]
    assert "make test" in runs


def test_publishes_the_book_from_main_only(book):
    test = _steps(book["jobs"]["test"])
    on_main = "github.ref == 'refs/heads/main'"
    build = [i for u, r, i, _ in test if r == "make book"]
    upload = [(i, w) for u, r, i, w in test if u.startswith("actions/upload-pages-artifact@")]
    assert build and on_main in build[0]
    assert upload and on_main in upload[0][0] and upload[0][1]["path"] == "_build/html"
    assert [r for _, r, _, _ in test].index("make test") < [r for _, r, _, _ in test].index("make book")
    deploy = book["jobs"]["deploy"]
    assert deploy["needs"] == "test" and on_main in deploy["if"]
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert deploy["environment"]["name"] == "github-pages"
    assert any(u.startswith("actions/deploy-pages@") for u, _, _, _ in _steps(deploy))
    assert book["permissions"] == {"contents": "read"}  # nothing else may write


def test_launch_buttons_point_at_the_repository(book):
    env = book["jobs"]["test"]["env"]
    assert env["WSAE_REPO_URL"] == "${{ github.server_url }}/${{ github.repository }}"
    assert "WSAE_REPO_URL" in (ROOT / "book" / "_ext" / "wsae_sphinx.py").read_text()
