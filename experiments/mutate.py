"""Mutation check: apply one-line bugs to core files one at a time and see whether the tests notice.

    python -m experiments.mutate                      # every mutant in experiments/mutations.yaml
    python -m experiments.mutate --only gardo ema     # mutants whose id contains one of these words
    python -m experiments.mutate --confirm            # re-run survivors against the whole suite
    python -m experiments.mutate --list               # show the mutants and whether they still apply
    python -m experiments.mutate --only ema --tests tests/test_ema_schedule.py   # does this test catch them?

Each mutant replaces one exact snippet (it must occur exactly once in its file) in a *scratch copy* of
the working tree, never in the tree itself, and runs the tests mapped to that file with ``pytest -x -q``
on one thread. A mutant is *killed* when a test fails, *survived* when all pass, *stale* when its
snippet no longer occurs once (the code moved on: update the list). ``--confirm`` re-runs survivors on
the whole default suite, so the reported kill rate is the suite's, not only the mapped tests'.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
MUTATIONS = Path(__file__).with_name("mutations.yaml")
COPIED = ("tmpo", "baselines", "conf", "tests", "experiments", "pyproject.toml")

# tests that exercise each core file (prefix match, longest wins); survivors are confirmed on the whole suite
TESTS_FOR = {
    "tmpo/ema.py": ["test_ema_schedule.py", "test_loop.py"],
    "tmpo/loop.py": ["test_ema_schedule.py", "test_loop_wiring.py", "test_loop.py", "test_resume_all_methods.py",
                     "test_baselines.py", "test_distributed_run.py"],
    "tmpo/update.py": ["test_update.py", "test_loop.py", "test_resume_all_methods.py", "test_baselines.py",
                       "test_distributed.py"],
    "tmpo/sde.py": ["test_sde.py", "test_update.py", "test_tree_sampler.py"],
    "tmpo/objectives/": ["test_likelihood.py", "test_objectives.py", "test_grpo_options.py", "test_stepwise_sign.py",
                         "test_baselines.py", "test_update.py"],
    "tmpo/samplers/": ["test_mini_policy.py", "test_tree_sampler.py", "test_branching.py", "test_baselines.py",
                       "test_update.py", "test_science_cells.py"],
    "tmpo/policies/base.py": ["test_baselines.py", "test_resume_all_methods.py", "test_mini_policy.py"],
    "tmpo/likelihood.py": ["test_likelihood.py"],
    "tmpo/distributed.py": ["test_distributed.py"],
    "tmpo/seeding.py": ["test_distributed.py"],
    "tmpo/evaluation.py": ["test_distributed.py", "test_eval_metrics.py"],
    "tmpo/checkpoint.py": ["test_loop.py", "test_resume_all_methods.py"],
    "baselines/gardo.py": ["test_gardo_gate.py", "test_baselines.py", "test_resume_all_methods.py"],
    "baselines/": ["test_baselines.py", "test_resume_all_methods.py"],
}


@dataclass
class Mutant:
    id: str
    file: str
    find: str
    replace: str
    why: str = ""

    def tests(self) -> list[str]:
        keys = [k for k in TESTS_FOR if self.file.startswith(k)]
        if not keys:
            return ["tests"]
        return [f"tests/{t}" for t in TESTS_FOR[max(keys, key=len)]]


def load_mutants(path: Path = MUTATIONS) -> list[Mutant]:
    raw = yaml.safe_load(path.read_text())
    mutants = [Mutant(**m) for m in raw]
    ids = [m.id for m in mutants]
    if len(set(ids)) != len(ids):
        raise SystemExit(f"duplicate mutant ids in {path}: {sorted({i for i in ids if ids.count(i) > 1})}")
    for m in mutants:
        if m.find == m.replace:
            raise SystemExit(f"mutant {m.id}: find and replace are identical")
    return mutants


def snapshot(dest: Path) -> None:
    """Copy the tracked and untracked (not ignored) files the tests need into ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", *COPIED], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.split("\n")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run_tests(workdir: Path, tests: list[str], timeout: float) -> tuple[str, float, str]:
    """``(outcome, seconds, last line)`` with outcome ``pass``, ``fail`` or ``timeout``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0, ""
    tail = (out.stdout.strip().splitlines() or [""])[-1]
    return ("pass" if out.returncode == 0 else "fail"), time.perf_counter() - t0, tail


def check_imports_resolve_to(workdir: Path) -> None:
    """The editable install maps ``tmpo`` to the real tree; the copy must win (cwd first on sys.path)."""
    out = subprocess.run([sys.executable, "-c", "import tmpo, baselines; print(tmpo.__file__); print(baselines.__file__)"],
                         cwd=workdir, capture_output=True, text=True, check=True).stdout.split()
    if not all(Path(p).resolve().is_relative_to(workdir.resolve()) for p in out):
        raise SystemExit(f"imports resolve outside the scratch copy: {out}")


def apply(workdir: Path, m: Mutant) -> str | None:
    """Write the mutant into the copy; return the original text, or None if the snippet is not there once."""
    path = workdir / m.file
    if not path.exists():
        return None
    text = path.read_text()
    if text.count(m.find) != 1:
        return None
    path.write_text(text.replace(m.find, m.replace))
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help="run mutants whose id contains any of these words")
    ap.add_argument("--tests", nargs="*", default=None, help="run these tests for every mutant instead of the mapped ones "
                    "(does *my new test* catch these bugs?)")
    ap.add_argument("--confirm", action="store_true", help="re-run survivors on the whole default suite")
    ap.add_argument("--list", action="store_true", help="list the mutants and whether they apply, run nothing")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per test run (a timeout counts as killed)")
    ap.add_argument("--out", type=Path, default=None, help="write the per-mutant results as JSON here")
    args = ap.parse_args(argv)

    mutants = load_mutants()
    if args.only:
        mutants = [m for m in mutants if any(w in m.id for w in args.only)]
    with tempfile.TemporaryDirectory(prefix="tmpo-mutate-") as tmp:
        work = Path(tmp)
        snapshot(work)
        check_imports_resolve_to(work)
        if args.list:
            for m in mutants:
                original = apply(work, m)
                if original is not None:
                    (work / m.file).write_text(original)
                state = "ok" if original is not None else "STALE"
                print(f"{state:5s} {m.id:40s} {m.file}  {m.why}")
            return 0
        tests_for = (lambda m: list(args.tests)) if args.tests else (lambda m: m.tests())
        groups = sorted({tuple(tests_for(m)) for m in mutants})
        for tests in groups:  # the unmutated code must pass the tests that judge the mutants
            outcome, secs, tail = run_tests(work, list(tests), args.timeout)
            print(f"baseline {' '.join(tests)}: {outcome} ({secs:.0f}s) {tail}", flush=True)
            if outcome != "pass":
                raise SystemExit("the unmutated tree fails its tests: fix that first")
        results = []
        for i, m in enumerate(mutants, 1):
            original = apply(work, m)
            if original is None:
                results.append({"id": m.id, "file": m.file, "outcome": "stale", "why": m.why})
                print(f"[{i}/{len(mutants)}] {m.id}: STALE (snippet not found exactly once in {m.file})", flush=True)
                continue
            try:
                outcome, secs, tail = run_tests(work, tests_for(m), args.timeout)
                if outcome == "pass" and args.confirm:
                    outcome, more, tail = run_tests(work, ["tests"], args.timeout * 3)
                    secs += more
            finally:
                (work / m.file).write_text(original)
            status = {"pass": "SURVIVED", "fail": "killed", "timeout": "killed (timeout)"}[outcome]
            results.append({"id": m.id, "file": m.file, "outcome": status, "seconds": round(secs, 1), "why": m.why})
            print(f"[{i}/{len(mutants)}] {m.id}: {status} ({secs:.0f}s)  {m.why}", flush=True)
    live = [r for r in results if r["outcome"] != "stale"]
    killed = [r for r in live if r["outcome"].startswith("killed")]
    survived = [r for r in live if r["outcome"] == "SURVIVED"]
    print(f"\nkilled {len(killed)}/{len(live)} ({100 * len(killed) / max(len(live), 1):.1f}%), "
          f"stale {len(results) - len(live)}{'' if args.confirm else ' (survivors not confirmed on the whole suite)'}")
    for r in survived:
        print(f"  survived: {r['id']} ({r['file']}): {r['why']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"killed": len(killed), "live": len(live), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
