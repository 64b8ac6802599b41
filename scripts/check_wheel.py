"""The wheel works: build what `pip install .` installs, install it into a fresh virtual environment, and run
`python -m train +debug=smoke`, then `python -m eval` and `python -m serve.export` on that run, from a temporary
directory outside the checkout. CI runs it (.ci/run).

    python scripts/check_wheel.py [SOURCE]     # SOURCE: a git checkout, default this one

The wheel is built from a clean copy of the checkout's files (tracked and untracked, not ignored), so a stale
`build/` or an editable install cannot fill a gap in the package; the environment gets the wheel and its
dependencies from the package index (pip's cache, after CI's first install) and nothing else. Before the
commands run, every first-party package is checked to import from that environment's site-packages, never
from the checkout. Exits 1 with the failing command's output on failure; prints each step's wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("configs", "data", "towers", "train", "eval", "serve")
# Prints {package: file} and the environment's site-packages, as the installed commands resolve them.
WHERE = ("import importlib, json, sysconfig; print(json.dumps({'site': sysconfig.get_paths()['purelib'], "
         "'files': {p: importlib.import_module(p).__file__ for p in %r}}))" % (PACKAGES,))


class CheckFailed(Exception):
    """A step failed; the message holds its command and the tail of its output."""


def step(name: str, cmd: list[str], cwd: pathlib.Path, env: dict | None = None) -> str:
    """Runs one step, prints its wall time, returns its stdout; raises CheckFailed on a non-zero exit."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    print(f"{name}: {time.perf_counter() - t0:.1f}s", flush=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise CheckFailed(f"{name} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc.stdout


def copy_sources(source: pathlib.Path, dest: pathlib.Path) -> None:
    """Copies the checkout's files that git tracks or would track (not ignored ones: .venv/, build/, ...)."""
    listed = subprocess.run(["git", "-C", str(source), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = source / rel
        if src.is_file():  # a tracked file deleted in the working tree is left out, as a build would
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def check_installed_from(python: pathlib.Path, cwd: pathlib.Path, env: dict, source: pathlib.Path) -> None:
    """Raises CheckFailed unless every first-party package imports from the environment, not the checkout."""
    where = json.loads(step("import check", [str(python), "-c", WHERE], cwd, env))
    site = pathlib.Path(where["site"]).resolve()
    for package, file in where["files"].items():
        path = pathlib.Path(file).resolve()
        if not path.is_relative_to(site) or path.is_relative_to(source):
            raise CheckFailed(f"{package} imports from {path}, not from the wheel installed in {site}")


def check(source: pathlib.Path, work: pathlib.Path) -> None:
    """Builds, installs and runs the three commands under `work`; raises CheckFailed on the first failure."""
    copy_sources(source, work / "src")
    step("build wheel", [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(work / "src"), "-w",
                         str(work / "dist")], work)
    (wheel,) = (work / "dist").glob("twotower-*.whl")
    step("fresh venv", [sys.executable, "-m", "venv", str(work / "venv")], work)
    python = work / "venv" / "bin" / "python"
    step("install wheel", [str(python), "-m", "pip", "install", "-q", str(wheel)], work)
    shutil.rmtree(work / "src")  # nothing of the sources is left to import from but the installed wheel
    outside = work / "cwd"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    env["JAX_PLATFORMS"] = "cpu"
    check_installed_from(python, outside, env, source)
    run = outside / "run"
    step("python -m train +debug=smoke", [str(python), "-m", "train", "+debug=smoke", f"hydra.run.dir={run}"],
         outside, env)
    step("python -m eval", [str(python), "-m", "eval", f"run_dir={run}"], outside, env)
    step("python -m serve.export", [str(python), "-m", "serve.export", f"run_dir={run}"], outside, env)
    for pattern in ("final_metrics.json", "eval/step_*/metrics.json", "export/*/manifest.json"):
        if not any(run.glob(pattern)):
            raise CheckFailed(f"the commands exited 0 but wrote no {run / pattern}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", type=pathlib.Path, default=REPO, help="a git checkout (default: this one)")
    source = parser.parse_args().source.resolve()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="twotower-wheel-") as work:
        try:
            check(source, pathlib.Path(work))
        except CheckFailed as e:
            sys.exit(f"wheel check: {e}")
    print(f"wheel check passed in {time.perf_counter() - t0:.0f}s: the installed wheel trains, evaluates and "
          "exports from outside the checkout")


if __name__ == "__main__":
    main()
