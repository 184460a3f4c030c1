"""Re-check surviving mutants against the current source and tests, after tests were written for them.

mutmut keeps its results per mutant name, and a changed source file makes it start that module
again. This applies each named survivor's change (the ``-``/``+`` lines that ``mutmut show`` prints,
read from the clone where mutmut ran) to this checkout's module, runs the given tests, and restores
the file: ``killed`` when a test fails, ``survived`` when none does, ``not applicable`` when the
mutated lines no longer occur exactly once (the function changed since; check those by hand).

    python tools/mutation_recheck.py --mutmut-clone ../run --module train --tests tests/test_train.py \\
        --select "resume or checkpoint" --names survivors.json --out recheck.json

``--trampoline``: where the module has not changed since mutmut generated its mutants, run each
mutant through mutmut's own switch instead (the given test files are copied into the clone's
``mutants/tests`` and run there with ``MUTANT_UNDER_TEST=<name>``): every mutant applies, also those
whose changed line occurs more than once in the module.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def mutant_change(clone: Path, name: str) -> tuple[str, str]:
    """``(old, new)`` source text of mutant ``name``, from ``mutmut show`` in ``clone``."""
    diff = subprocess.run([str(clone / ".venv" / "bin" / "mutmut"), "show", name], cwd=clone,
                          capture_output=True, text=True, check=True).stdout
    lines = [line for line in diff.splitlines() if not line.startswith(("+++", "---"))]
    return ("\n".join(line[1:] for line in lines if line.startswith("-")),
            "\n".join(line[1:] for line in lines if line.startswith("+")))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mutmut-clone", type=Path, required=True, help="the checkout where mutmut ran (its mutants/ and .venv)")
    p.add_argument("--module", required=True, help="wsae_core module, e.g. train")
    p.add_argument("--tests", required=True, help="test file(s) to run, e.g. tests/test_train.py")
    p.add_argument("--select", default=None, help="pytest -k expression (default: every test in --tests)")
    p.add_argument("--names", type=Path, required=True, help="JSON list of mutant names")
    p.add_argument("--out", type=Path, required=True, help="JSON {name: verdict} to write")
    p.add_argument("--trampoline", action="store_true",
                   help="select each mutant with mutmut's MUTANT_UNDER_TEST in the clone's mutants/ (module unchanged since)")
    p.add_argument("--fork", action="store_true",
                   help="with --trampoline: one process imports the libraries once and forks a child per mutant "
                        "(as mutmut's runner does) instead of starting pytest afresh for each")
    args = p.parse_args()
    if args.trampoline:
        return _trampoline(args)
    path = Path("wsae_core") / f"{args.module}.py"
    source = path.read_text()
    verdicts = {}
    for name in json.loads(args.names.read_text()):
        old, new = mutant_change(args.mutmut_clone, name)
        if not old or source.count(old) != 1:
            verdicts[name] = "not applicable"
        else:
            path.write_text(source.replace(old, new))
            try:
                cmd = [sys.executable, "-m", "pytest", *args.tests.split(), "-q", "-x", "-p", "no:cacheprovider"]
                run = subprocess.run(cmd + (["-k", args.select] if args.select else []), capture_output=True, timeout=600)
                verdicts[name] = "killed" if run.returncode else "survived"
            except subprocess.TimeoutExpired:
                verdicts[name] = "killed (timeout)"
            finally:
                path.write_text(source)
        print(name, verdicts[name], flush=True)
    args.out.write_text(json.dumps(verdicts, indent=1) + "\n")
    print({v: list(verdicts.values()).count(v) for v in sorted(set(verdicts.values()))})
    return 0


def _trampoline(args) -> int:
    mutants = args.mutmut_clone / "mutants"
    tests = args.tests.split()
    for t in tests:
        shutil.copy(t, mutants / t)
    python = str((args.mutmut_clone / ".venv" / "bin" / "python").absolute())  # not resolve(): the venv is the link
    cmd = [python, "-m", "pytest", *tests, "-q", "-x", "-p", "no:cacheprovider"] + (["-k", args.select] if args.select else [])
    clean = subprocess.run(cmd, cwd=mutants, capture_output=True, env={**os.environ, "MUTANT_UNDER_TEST": "none"})
    if clean.returncode:
        raise SystemExit(f"the tests fail without a mutant in {mutants}:\n{clean.stdout.decode()[-2000:]}")
    if args.fork:
        return _forked(args, mutants, python, cmd[3:])
    verdicts = {}
    for name in json.loads(args.names.read_text()):
        try:
            run = subprocess.run(cmd, cwd=mutants, capture_output=True, timeout=600, env={**os.environ, "MUTANT_UNDER_TEST": name})
            verdicts[name] = "killed" if run.returncode else "survived"
        except subprocess.TimeoutExpired:
            verdicts[name] = "killed (timeout)"
        print(name, verdicts[name], flush=True)
    args.out.write_text(json.dumps(verdicts, indent=1) + "\n")
    print({v: list(verdicts.values()).count(v) for v in sorted(set(verdicts.values()))})
    return 0


# Run by the clone's Python in its mutants/ folder: import once, then fork one pytest run per mutant.
_FORK_RUNNER = r"""
import json, os, sys, signal
sys.path.insert(0, os.getcwd())
import numpy, torch, pytest  # noqa: F401  (loaded once, shared by every child)
import wsae_core, wsae_core.{module}  # noqa: F401
names, args, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
verdicts = {{}}
for name in names:
    pid = os.fork()
    if pid == 0:
        os.environ["MUTANT_UNDER_TEST"] = name
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1), os.dup2(devnull, 2)
        signal.alarm(600)
        os._exit(int(pytest.main(args)))
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    verdicts[name] = "survived" if code == 0 else "killed (timeout)" if code == -signal.SIGALRM else "killed"
    print(name, verdicts[name], flush=True)
    with open(out, "w") as f:
        json.dump(verdicts, f, indent=1)
"""


def _forked(args, mutants: Path, python: str, pytest_args: list[str]) -> int:
    names = json.loads(args.names.read_text())  # the clean run in _trampoline has checked the tests pass
    run = subprocess.run([python, "-c", _FORK_RUNNER.format(module=args.module), json.dumps(names),
                          json.dumps(pytest_args), str(args.out.absolute())], cwd=mutants, text=True)
    verdicts = json.loads(args.out.read_text()) if args.out.exists() else {}
    print({v: list(verdicts.values()).count(v) for v in sorted(set(verdicts.values()))})
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
