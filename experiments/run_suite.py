"""Run the paper's table blocks (conf/experiment/**) resumably and record their finished runs.

    python -m experiments.run_suite plan mini                  # every job, its state, the estimated cost
    python -m experiments.run_suite run mini/table1_geneval    # one block (or `mini`: all six), two lanes
    python -m experiments.run_suite collect mini               # copy finished runs to results/mini/records

A job is one (row, seed) of a block, launched as its own one-job multirun through the same launcher a
cluster uses (``python -m tmpo.run -m experiment=<block> experiment/row=<row> trainer.seed=<k>
hydra/launcher=local``) into a fixed directory ``runs/<scale>/<block>/<row>/seed<k>``, so a stopped
suite continues where it was: a job with a checkpoint resumes it (``resume=auto``; the mini blocks
checkpoint every iteration), a finished one is not rerun. ``--lanes`` jobs run at once (one thread each),
longest first; with ``--until HH:MM`` a lane only starts a job whose estimated wall time (bench cost x
``--wall-factor``) ends before then, taking the longest that still fits -- for machines whose session
ends and takes the unfinished runs' directories with it. The untouched model is evaluated on each row's first seed only (its eval is identical for
every run of a block: fixed eval noise). When a job finishes, its ``config.yaml``, ``summary.json`` and
slimmed ``metrics.jsonl`` are copied to ``results/<scale>/records/<block>/<row>/seed<k>/`` -- what ``make
tables`` reads and what gets committed; a job recorded there is never launched again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
BLOCKS = {
    scale: [f"{prefix}{b}" for b in ("table1_geneval", "table1_ocr", "table1_pickscore", "table2_ablation",
                                     "table5_joint", "table6_sd35")]
    for scale, prefix in (("mini", "mini/"), ("paper", ""))
}
BENCH = REPO / "results" / "bench" / "summary.json"  # make bench: {backend: {cell: {iter_s_median, ...}}}
# Seconds for one evaluation (task suite + DrawBench-style suite, 10 images per prompt, 28 steps, one
# thread), measured with a pilot on this machine for the mini blocks' eval sizes (mini/_common.yaml).
EVAL_S = {("mini", "geneval"): 97.0, ("mini", "ocr"): 74.0, ("mini", "pickscore"): 43.0, ("mini", "joint"): 44.0,
          ("mini_mmdit", "pickscore"): 57.0}
MMDIT_FACTOR = 1.37  # the mini MMDiT's cost relative to the DiT (its evaluation took 1.37x as long)


@dataclass(frozen=True)
class Job:
    block: str  # experiment name, e.g. mini/table1_geneval
    row: str
    seed: int
    first_seed: bool  # evaluates the untouched model too
    scale: str
    protocol: str
    model: str  # model config choice (mini | mini_mmdit | ...)
    method: str
    ablation: str
    total_steps: int
    runs_root: Path
    records_root: Path

    @property
    def name(self) -> str:
        return self.block.split("/")[-1]

    @property
    def run_dir(self) -> Path:
        return self.runs_root / self.scale / self.name / self.row / f"seed{self.seed}"

    @property
    def record_dir(self) -> Path:
        return self.records_root / self.scale / "records" / self.name / self.row / f"seed{self.seed}"

    def command(self, extra: list[str] = ()) -> list[str]:
        return [sys.executable, "-m", "tmpo.run", "-m", f"experiment={self.block}", f"experiment/row={self.row}",
                f"trainer.seed={self.seed}", "hydra/launcher=local", "hydra.launcher.timeout_min=1440",
                f"hydra.sweep.dir={self.run_dir.parent.parent}", f"hydra.sweep.subdir={self.row}/seed{self.seed}",
                "resume=auto", "trainer.progress=false", *([] if self.first_seed else ["trainer.eval_base=false"]),
                *extra]


def _sweep_values(params, key: str, block: str) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if key not in params:
        raise ValueError(f"experiment {block} does not sweep {key} (hydra.sweeper.params); "
                         "every block names its rows and seeds")
    override = OverridesParser.create().parse_override(f"{key}={params[key]}")
    return list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.get_value_element_as_str()]


def block_jobs(block: str, runs_root: Path = REPO / "runs", records_root: Path = REPO / "results",
               extra: list[str] = ()) -> list[Job]:
    """Every (row, seed) job of a block, read from the block's own sweep (``hydra.sweeper.params``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tmpo.run import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        top = compose(config_name="config", overrides=[f"experiment={block}", "run_dir=.", *extra],
                      return_hydra_config=True)
        rows = _sweep_values(top.hydra.sweeper.params, "experiment/row", block)
        seeds = [int(s) for s in _sweep_values(top.hydra.sweeper.params, "trainer.seed", block)]
        jobs = []
        for row in rows:
            cfg = compose(config_name="config", return_hydra_config=True,
                          overrides=[f"experiment={block}", f"experiment/row={row}", "run_dir=.", *extra])
            for seed in seeds:
                jobs.append(Job(block, row, seed, seed == seeds[0], str(cfg.tags.scale), str(cfg.tags.protocol),
                                str(cfg.hydra.runtime.choices.model), str(cfg.method), str(cfg.ablation),
                                int(cfg.trainer.total_steps), runs_root, records_root))
    GlobalHydra.instance().clear()
    return jobs


def expand(names: list[str]) -> list[str]:
    """``mini``/``paper`` -> their six blocks; anything else is a block name."""
    return [b for n in names for b in BLOCKS.get(n, [n])]


def job_state(job: Job) -> str:
    """recorded (copied to results/) | finished (not yet copied) | partial (has a checkpoint) | fresh."""
    from tmpo.results.runs import LocalRuns

    if (job.record_dir / "summary.json").exists():
        return "recorded"
    if (job.run_dir / "config.yaml").exists() and LocalRuns(job.run_dir.parent).read(job.run_dir).finished:
        return "finished"
    return "partial" if (job.run_dir / "checkpoints" / "latest.pt").exists() else "fresh"


def iteration_costs(bench: Path = BENCH) -> dict[str, float]:
    """Seconds per mini iteration (one thread, 4 prompts) per method/ablation cell from ``make bench``'s file."""
    if not bench.exists():
        raise FileNotFoundError(f"{bench} is missing: run `make bench` (python -m experiments.bench)")
    mini = json.loads(bench.read_text()).get("mini")
    if not mini:
        raise KeyError(f"{bench} has no 'mini' backend: run `make bench`")
    return {cell: float(row["iter_s_median"]) for cell, row in mini.items()}


def job_cost(job: Job, costs: dict[str, float]) -> float:
    """Estimated seconds of a mini job: iterations x iteration cost + evaluations (two on the first seed)."""
    key = "no_tree" if job.ablation == "no_tree" else job.method
    if key not in costs:
        raise KeyError(f"no iteration time for {key!r} in {BENCH}; rerun `make bench`")
    factor = MMDIT_FACTOR if job.model == "mini_mmdit" else 1.0
    evals = EVAL_S.get((job.model, job.protocol), 0.0) * (2 if job.first_seed else 1)
    return job.total_steps * costs[key] * factor + evals


def plan(jobs: list[Job], lanes: int) -> pd.DataFrame:
    """One line per job with its state and estimated cost; prints the totals."""
    costs = iteration_costs() if all(j.scale == "mini" for j in jobs) else None
    lines = [{"block": j.block, "row": j.row, "seed": j.seed, "steps": j.total_steps, "state": job_state(j),
              "est_s": job_cost(j, costs) if costs else float("nan")} for j in jobs]
    df = pd.DataFrame(lines)
    todo = df[~df.state.isin(["recorded", "finished"])]
    print(df.groupby(["block", "state"]).size().unstack(fill_value=0).to_string())
    if costs:
        total = todo.est_s.sum()
        print(f"\n{len(todo)} of {len(df)} jobs to run: ~{total / 3600:.1f} core-hours, ~{total / 3600 / lanes:.1f} h "
              f"on {lanes} lanes (iteration costs from {BENCH.relative_to(REPO)}, evaluations from EVAL_S)")
    return df


def collect(jobs: list[Job]) -> list[Path]:
    """Copy every finished, not yet recorded job's run to its record dir."""
    from tmpo.results.runs import copy_run

    copied = [copy_run(j.run_dir, j.record_dir) for j in jobs if job_state(j) == "finished"]
    for p in copied:
        print(f"recorded {p}")
    return copied


def next_job(queue: list[Job], estimate, deadline: float | None, now: float) -> Job | None:
    """Pop the first job of ``queue`` (longest first) whose estimated seconds ``estimate(job)`` end before
    ``deadline`` (epoch seconds; None = no deadline); None when no job fits."""
    for i, job in enumerate(queue):
        if deadline is None or now + estimate(job) <= deadline:
            return queue.pop(i)
    return None


def run(jobs: list[Job], lanes: int, extra: list[str] = (), log=print, deadline: float | None = None,
        wall_factor: float = 1.0) -> list[Job]:
    """Launch every job that is neither recorded nor finished, ``lanes`` at a time, longest first (with a
    ``deadline``, only jobs estimated to end before it); record each as it finishes. Returns the jobs
    that failed."""
    collect(jobs)
    todo = [j for j in jobs if job_state(j) in ("fresh", "partial")]
    try:
        costs = iteration_costs()
        estimate = (lambda j: job_cost(j, costs) * wall_factor if j.scale == "mini" else 0.0)
    except (FileNotFoundError, KeyError):
        if deadline is not None:
            raise
        estimate = (lambda j: 0.0)
    todo.sort(key=lambda j: -estimate(j))
    queue, failed, lock = list(todo), [], threading.Lock()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_SILENT": "true"}

    def lane() -> None:
        while True:
            with lock:
                job = next_job(queue, estimate, deadline, time.time())
                if job is None:
                    if queue:
                        log(f"lane stops: none of the {len(queue)} remaining jobs is estimated to end before the deadline")
                    return
            log_path = job.run_dir.parent.parent / "logs" / f"{job.row}_seed{job.seed}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            log(f"start  {job.block} {job.row} seed {job.seed} ({job_state(job)}; log {log_path})")
            with log_path.open("a") as f:
                rc = subprocess.run(job.command(list(extra)), cwd=REPO, env=env, stdout=f,
                                    stderr=subprocess.STDOUT).returncode
            state = job_state(job)
            if rc == 0 and state == "finished":
                with lock:
                    from tmpo.results.runs import copy_run

                    copy_run(job.run_dir, job.record_dir)
                minutes = (time.time() - t0) / 60
                log(f"done   {job.block} {job.row} seed {job.seed} in {minutes:.1f} min (estimated "
                    f"{estimate(job) / 60:.1f}) -> {job.record_dir}")
            else:
                with lock:
                    failed.append(job)
                log(f"FAILED {job.block} {job.row} seed {job.seed} (exit {rc}, {state}); see {log_path} and "
                    f"{job.run_dir.parent.parent}/.submitit/")

    threads = [threading.Thread(target=lane) for _ in range(max(1, lanes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failed


def _deadline(until: str | None) -> float | None:
    """``HH:MM`` -> the next such local time in epoch seconds."""
    if until is None:
        return None
    try:
        hour, minute = (int(x) for x in until.split(":"))
        now = time.localtime()
        t = time.mktime((now.tm_year, now.tm_mon, now.tm_mday, hour, minute, 0, 0, 0, -1))
    except (ValueError, OverflowError):
        raise SystemExit(f"--until {until!r}: expected HH:MM, e.g. --until 16:30") from None
    return t if t > time.time() else t + 86400


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("plan", "run", "collect"))
    ap.add_argument("blocks", nargs="+", help="block names (mini/table1_geneval, ...) or a scale: mini | paper")
    ap.add_argument("--lanes", type=int, default=2, help="jobs at once (one thread each)")
    ap.add_argument("--rows", nargs="+", help="only these rows")
    ap.add_argument("--seeds", nargs="+", type=int, help="only these seeds")
    ap.add_argument("--runs-root", type=Path, default=REPO / "runs", help="where runs train (gitignored)")
    ap.add_argument("--records-root", type=Path, default=REPO / "results", help="where finished runs are recorded")
    ap.add_argument("--until", help="HH:MM (local time, today or tomorrow): start only jobs estimated to end by then")
    ap.add_argument("--wall-factor", type=float, default=1.6,
                    help="wall seconds per bench CPU second on two lanes (measured 1.24-1.54 beside other work, "
                         "0.63-1.26 with the lanes nearly alone; results/mini/README.md)")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for every job (e.g. for a smoke test)")
    args = ap.parse_args(argv)
    jobs = [j for b in expand(args.blocks) for j in block_jobs(b, args.runs_root, args.records_root, args.extra)
            if (not args.rows or j.row in args.rows) and (not args.seeds or j.seed in args.seeds)]
    if not jobs:
        raise SystemExit("no jobs match the blocks/rows/seeds given")
    if args.action == "plan":
        plan(jobs, args.lanes)
        return 0
    if args.action == "collect":
        collect(jobs)
        return 0
    failed = run(jobs, args.lanes, args.extra, deadline=_deadline(args.until), wall_factor=args.wall_factor)
    recorded = sum(job_state(j) == "recorded" for j in jobs)
    print(f"{recorded} of {len(jobs)} jobs recorded under {args.records_root}; {len(failed)} failed. "
          "Commit the records (git add results/<scale>/records) and run `make tables`.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
