"""Speed and memory of every method against the lower bound its network evaluations allow (``make bench``).

    python -m experiments.bench                                  # toy, mini, flux_tiny (~12 min on 2 shared cores)
    python -m experiments.bench --backends mini --passes 1       # a quicker look

For each backend and each cell (the six methods and TMPO's w/o-tree and fixed-branching ablations) the
shared loop is built exactly as ``tmpo.run`` builds it (each method's own config, K = 27, 4 prompts per
iteration, one thread). After one warm-up iteration it runs ``--passes`` passes over the iterations
:data:`RUN_STEPS` of a :data:`RUN_LENGTH`-iteration run: the same iterations, hence the same prompts and
initial noise, for every cell, spread over the run because the paper reports iteration time "averaged
over the full training run" and TMPO's branch curriculum, TreeGRPO's and MixGRPO's windows change the
cost along it. A repetition is one pass; its time is the mean over the pass's iterations. All cells of a
backend stay built and run interleaved, iteration by iteration, so that the load of other jobs on the
machine drifts over all of them alike.

Measured per iteration (instrumentation wraps the trainer's components, the loop itself is untouched):
seconds split into rollout / decode + reward + advantages / update, each velocity call (batch size;
sampling, update with grad, update without grad, reference), peak memory. On CPU the clock is the
process's CPU time (one thread; other jobs on the machine stretch the wall clock, which is reported beside
it, but hardly this) and memory the peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``); on a GPU
the clock is the synchronised wall clock and memory the CUDA peak.

The lower bound of an iteration uses the forward timings measured on the same model at the batch sizes
the iteration used (the sampler evaluates all nodes of a step in one batch, the update evaluates parents
in chunks of ``trainer.parent_chunk``): ``bound = sum_sample t_fwd(b) + sum_grad t_fwd_bwd(b) +
sum_ref t_ref(b) + t_reward``, and ``efficiency = bound / measured``. The update's no-grad recompute
(pass 1 of the optimizer steps after the first) is outside the bound: its time counts as inefficiency.

Writes ``results/bench/summary.json`` (``{backend: {cell: {...}}}``), ``details.json`` (machine, forward
timings, TMPO's update memory for K = 9, 27, 81, network evaluations over the whole run),
``iterations.csv`` (every timed iteration), ``<backend>.csv`` (one row per method, for experiments/run_suite.py's
budget) and ``README.md`` (the tables). Timings are not asserted by any test.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import gc
import json
import multiprocessing
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

import tmpo.loop
from tmpo.checkpoint import write_json_atomic, write_text_atomic
from tmpo.loop import Trainer
from tmpo.run import build_trainer, compose_config

CELLS: dict[str, list[str]] = {
    "tmpo": ["method=tmpo"],
    "grpo": ["method=grpo"],
    "flow_grpo": ["method=flow_grpo"],
    "mixgrpo": ["method=mixgrpo"],
    "treegrpo": ["method=treegrpo"],
    "gardo": ["method=gardo"],
    "no_tree": ["method=tmpo", "ablation=no_tree"],
    "fixed_branching": ["method=tmpo", "ablation=fixed_branching"],
}
LABELS = {
    "tmpo": "TMPO", "grpo": "GRPO on TMPO's tree", "flow_grpo": "Flow-GRPO", "mixgrpo": "MixGRPO",
    "treegrpo": "TreeGRPO", "gardo": "GARDO", "no_tree": "w/o tree (K=27)", "fixed_branching": "w/o dynamic branching",
}
BACKENDS: dict[str, list[str]] = {
    "toy": ["model=toy", "reward=gmm_modes"],
    "mini": ["model=mini", "reward=geneval"],
    "flux_tiny": ["model=flux_tiny", "reward=pickscore"],
}
PROMPTS = 4
GROUP_SIZE = 27
# The schedules play as in a run of the paper's PickScore length (App. D: 500 steps). The three timed
# iterations sit at 17%, 52% and 87% of it (TMPO's curriculum early, middle, late) and put TreeGRPO's
# window (3 starts, one per 25 iterations) and MixGRPO's (3 starts, one per 174 iterations) at each of
# their starts once, so the sample's mean cost is the run's mean for those schedules too.
RUN_LENGTH = 500
RUN_STEPS = (85, 260, 435)
WARMUP_STEP = 0
# update memory of TMPO versus K: fixed branch positions (K = 3^T) at two fixed parent chunks
K_SWEEP = {9: [1, 2], 27: [1, 2, 3], 81: [1, 2, 3, 4]}
K_SWEEP_CHUNKS = (8, 64)
# the paper's iteration times: Table 1 PickScore-only protocol on FLUX.1-dev, and Table 2 (the same
# protocol) for the ablations; its quoted ratios (0.63, 0.86, 0.55) come from these rows
PAPER_ROWS = {
    "tmpo": ("table1", "tmpo"), "flow_grpo": ("table1", "flow_grpo"), "mixgrpo": ("table1", "mixgrpo"),
    "treegrpo": ("table1", "treegrpo"), "gardo": ("table1", "gardo"),
    "no_tree": ("table2", "tmpo_no_tree_k27"), "fixed_branching": ("table2", "tmpo_fixed_branching"),
}
PAPER_PROTOCOL = "pickscore"
REPO = Path(__file__).resolve().parent.parent
PAPER_CSVS = (REPO / "results" / "reference" / "paper_tables.csv", REPO.parent / "shared" / "reference" / "paper_tables.csv")


# --- clocks and memory ---------------------------------------------------------------------------
class Clock:
    """Process CPU seconds on CPU (robust to other jobs sharing the machine); synchronised wall on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.name = "CUDA-synchronised wall-clock seconds" if self.cuda else "process CPU seconds (1 thread)"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()


def _proc_status_mb(field: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) / 1024 if m else None


def _peak_rss_resettable() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_status_mb("VmHWM") is not None


class Memory:
    """Peak memory since the last :meth:`reset`, in MB: CUDA peak allocated on a GPU, else peak RSS.

    Linux resets the RSS high-water mark through ``/proc/self/clear_refs``; elsewhere the peak is the
    process's lifetime peak (``resource.getrusage``) and :attr:`name` says so."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.resettable = self.cuda or _peak_rss_resettable()
        if self.cuda:
            self.name = "CUDA peak allocated"
        else:
            self.name = "peak RSS (VmHWM, reset per measurement)" if self.resettable else "peak RSS of the process so far (not resettable here)"

    def reset(self) -> float:
        """Start a new peak; return the current usage."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.resettable:
            Path("/proc/self/clear_refs").write_text("5")
        return self.current()

    def current(self) -> float:
        if self.cuda:
            return torch.cuda.memory_allocated() / 2**20
        if self.resettable:
            return _proc_status_mb("VmRSS") or float("nan")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def peak(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        if self.resettable:
            return _proc_status_mb("VmHWM") or float("nan")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_memory(collect: bool = True, trim: bool = True) -> None:
    """Free what earlier work left: garbage (``collect``), the CUDA cache, and glibc's free heap pages (``trim``:
    the next allocations then show up as RSS growth, at the cost of page faults in whatever runs next)."""
    if collect:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if trim:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


# --- instrumentation of one trainer ----------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    """One velocity evaluation: the phase it ran in, its batch size, and what kind of forward it was."""

    phase: str  # rollout | reward | update
    batch: int
    kind: str  # fwd (no grad) | fwd_bwd (grad, back-propagated) | ref (reference policy, no grad)


class Probe:
    """Times the phases of :meth:`Trainer.train_step`, records every velocity call and the peak memory.

    It wraps the trainer's sampler, scorer, objective and the loop's ``policy_update`` while installed;
    the loop's code is not changed."""

    def __init__(self, trainer: Trainer, clock: Clock, memory: Memory, trim_before_update: bool = False) -> None:
        self.trainer, self.clock, self.memory = trainer, clock, memory
        self.trim_before_update = trim_before_update  # return freed heap pages first: the update's own growth
        self.phase = "other"
        self.calls: list[Call] = []
        self.phase_s: dict[str, float] = defaultdict(float)
        self.overhead_s = 0.0
        self.update_start_mb = self.update_peak_mb = float("nan")

    def _timed(self, fn: Callable, phase: str, watch_memory: bool = False) -> Callable:
        def wrapper(*args, **kwargs):
            if watch_memory:
                t = self.clock()
                if self.trim_before_update:
                    release_memory(collect=False, trim=True)
                self.update_start_mb = self.memory.reset()
                self.overhead_s += self.clock() - t
            outer, self.phase = self.phase, phase
            t0 = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.phase_s[phase] += self.clock() - t0
                self.phase = outer
                if watch_memory:
                    self.update_peak_mb = self.memory.peak()
        return wrapper

    def _counted(self, velocity: Callable) -> Callable:
        policy = self.trainer.policy

        def wrapper(x, *args, **kwargs):
            kind = "fwd_bwd" if torch.is_grad_enabled() else ("ref" if policy._use_reference else "fwd")
            self.calls.append(Call(self.phase, int(x.shape[0]), kind))
            return velocity(x, *args, **kwargs)
        return wrapper

    @contextlib.contextmanager
    def installed(self):
        tr = self.trainer
        patched = [(tr.sampler, "rollout", "rollout"), (tr, "score", "reward"), (tr.objective, "prepare", "reward")]
        for obj, name, phase in patched:
            setattr(obj, name, self._timed(getattr(obj, name), phase))
        tr.policy.velocity = self._counted(tr.policy.velocity)
        update = tmpo.loop.policy_update
        tmpo.loop.policy_update = self._timed(update, "update", watch_memory=True)
        try:
            yield self
        finally:
            tmpo.loop.policy_update = update
            del tr.policy.velocity
            for obj, name, _ in patched:
                delattr(obj, name)  # the instance attribute shadowed the class's method

    def iteration(self, step: int, trim: bool = False) -> dict[str, Any]:
        """Run ``train_step(step)``; return its timings, network evaluations and memory growth.

        ``trim`` returns freed heap pages first, so that ``mem_growth_mb`` (peak minus the memory at the
        start) is the iteration's whole working memory; timed iterations leave the heap as training would."""
        self.calls, self.phase_s, self.overhead_s = [], defaultdict(float), 0.0
        release_memory(trim=trim)
        start = self.memory.reset()
        t0 = self.clock()
        metrics = self.trainer.train_step(step)
        iter_s = self.clock() - t0 - self.overhead_s
        growth = self.memory.peak() - start
        rec = {
            "step": step, "iter_s": iter_s, "iter_wall_s": metrics["iter_time_s"],
            "rollout_s": self.phase_s["rollout"], "reward_s": self.phase_s["reward"], "update_s": self.phase_s["update"],
            "rollout_wall_s": metrics["time/rollout_s"], "reward_wall_s": metrics["time/reward_s"], "update_wall_s": metrics["time/update_s"],
            "nfe_sample": metrics["nfe/sample_per_prompt"], "nfe_nograd_update": metrics.get("nfe/nograd_per_prompt", 0.0),
            "nfe_grad": metrics["nfe/grad_per_prompt"], "nfe_ref": metrics.get("nfe/ref_per_prompt", 0.0),
            "optimizer_steps": metrics["train/optimizer_steps"], "group_size": metrics["train/group_size"],
            "edges_per_prompt": metrics["train/edges_per_prompt"], "mem_growth_mb": growth,
            "update_peak_mb": self.update_peak_mb, "update_delta_mb": self.update_peak_mb - self.update_start_mb,
            "calls": list(self.calls),
        }
        check_counts(rec, self.trainer.cfg.prompts_per_step)
        return rec


def check_counts(rec: dict[str, Any], groups: int) -> None:
    """The recorded calls must add up to the loop's own per-prompt counters (else the probe is broken)."""
    totals: dict[tuple[str, str], int] = defaultdict(int)
    for c in rec["calls"]:
        totals[(c.phase, c.kind)] += c.batch
    expected = {("rollout", "fwd"): rec["nfe_sample"], ("update", "fwd_bwd"): rec["nfe_grad"],
                ("update", "fwd"): rec["nfe_nograd_update"], ("update", "ref"): rec["nfe_ref"]}
    for key, per_prompt in expected.items():
        if abs(totals.get(key, 0) - per_prompt * groups) > 1e-6:
            raise RuntimeError(f"probe counted {totals.get(key, 0)} {key} rows, the loop {per_prompt * groups}")


# --- forward timings on the same model --------------------------------------------------------------
def _median_seconds(fn: Callable[[], None], clock: Clock, min_reps: int = 3, min_total_s: float = 0.2) -> float:
    fn()  # warm-up (allocator, lazy initialisation)
    times: list[float] = []
    while len(times) < min_reps or (sum(times) < min_total_s and len(times) < 50):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return float(np.median(times))


class ForwardTimer:
    """Seconds of one velocity call at a batch size on a backend's model: without grad (``fwd``), through
    the reference policy (``ref``), with grad and a backward into the trainable parameters (``fwd_bwd``).
    One table per pass, measured right after the pass's iterations, so that it sees the same machine."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.table: dict[tuple[int, str], float] = {}

    def measure(self, trainer: Trainer, needed: set[tuple[int, str]]) -> None:
        todo = sorted(needed - set(self.table))
        if not todo:
            return
        policy = trainer.policy
        cond = policy.encode_prompts([t for t, _ in trainer.prompts.train(PROMPTS, np.random.default_rng(0))])
        params = [p for _, p in policy.trainable_named_parameters()]
        gen = torch.Generator().manual_seed(0)
        for batch, kind in todo:
            x = torch.randn((batch, *policy.latent_shape), generator=gen).to(policy.device, policy.dtype)
            sigma = (0.1 + 0.8 * torch.rand(batch, generator=gen)).to(policy.device, policy.dtype)
            index = (torch.arange(batch) % PROMPTS).to(policy.device)
            self.table[(batch, kind)] = _median_seconds(self._call(policy, params, kind, x, sigma, cond, index), self.clock)

    @staticmethod
    def _call(policy, params, kind, x, sigma, cond, index) -> Callable[[], None]:
        weight = torch.randn_like(x)

        def run() -> None:
            if kind == "fwd_bwd":
                (policy.velocity(x, sigma, cond, index) * weight).sum().backward()
                for p in params:
                    p.grad = None
                return
            with torch.no_grad(), (policy.reference() if kind == "ref" else contextlib.nullcontext()):
                policy.velocity(x, sigma, cond, index)
        return run

    def seconds(self, batch: int, kind: str) -> float:
        return self.table[(batch, kind)]


def iteration_bound(calls: list[Call], timer: ForwardTimer, reward_s: float) -> dict[str, float]:
    """The iteration's lower bound and its parts, from its actual calls (module doc)."""
    parts = {"sample": 0.0, "grad": 0.0, "ref": 0.0, "recompute": 0.0}
    for c in calls:
        if c.phase == "rollout":
            parts["sample"] += timer.seconds(c.batch, "fwd")
        elif c.phase == "update":
            parts[{"fwd_bwd": "grad", "ref": "ref", "fwd": "recompute"}[c.kind]] += timer.seconds(c.batch, c.kind)
    bound = parts["sample"] + parts["grad"] + parts["ref"] + reward_s
    return {"bound_s": bound, **{f"bound_{k}_s": v for k, v in parts.items() if k != "recompute"}, "recompute_s": parts["recompute"]}


# --- network evaluations over the whole run, from the plans -----------------------------------------
def plan_counts(plan) -> tuple[int, int]:
    """``(velocity evaluations, stored model parents)`` per prompt of one rollout plan (as the sampler runs it)."""
    nodes, nfe, parents = plan.n_roots, 0, 0
    for step in plan.steps:
        nfe += nodes
        parents += nodes if step.store else 0
        nodes *= step.branch
    return nfe, parents


def run_counts(trainer: Trainer) -> dict[str, float]:
    """Mean sampling NFE and stored model parents per prompt over every iteration of the run, and at the timed iterations."""
    gen = torch.Generator().manual_seed(0)
    counts = np.array([plan_counts(trainer.sampler.make_plan(s, RUN_LENGTH, gen)) for s in range(RUN_LENGTH)], dtype=float)
    timed = counts[list(RUN_STEPS)]
    return {"nfe_sample_run": float(counts[:, 0].mean()), "parents_run": float(counts[:, 1].mean()),
            "nfe_sample_timed": float(timed[:, 0].mean()), "parents_timed": float(timed[:, 1].mean())}


# --- one cell ------------------------------------------------------------------------------------------
def cell_overrides(backend: str, cell_args: list[str], run_dir: str) -> list[str]:
    return [f"run_dir={run_dir}", "logger=none", "trainer.progress=false", "trainer.threads=1",
            f"trainer.total_steps={RUN_LENGTH}", f"trainer.prompts_per_step={PROMPTS}", *BACKENDS[backend], *cell_args]


@dataclass
class CellRun:
    """One cell's live trainer and probe, its memory and its timed iterations."""

    trainer: Trainer
    probe: Probe
    trainer_mb: float  # what building the trainer added to the process (model, reward, optimizer, ...)
    warmup_growth_mb: float  # the warm-up iteration's peak growth from a trimmed heap
    records: list[dict]


def start_cell(backend: str, cell: str, run_dir: str) -> CellRun:
    release_memory()
    before = Memory(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")).current()
    trainer = build_trainer(compose_config(cell_overrides(backend, CELLS[cell], run_dir)))
    torch.set_num_threads(1)
    device = trainer.policy.device
    memory = Memory(device)
    release_memory()
    trainer_mb = memory.current() - before
    probe = Probe(trainer, Clock(device), memory)
    with probe.installed():
        warm = probe.iteration(WARMUP_STEP, trim=True)
    return CellRun(trainer, probe, trainer_mb, warm["mem_growth_mb"], [])


def attach_bounds(runs: dict[str, CellRun], records: list[dict]) -> dict[tuple[int, str], float]:
    """Time the forwards that ``records`` used (once per batch size and kind, on the first cell's model,
    which every cell of a backend shares) and attach each record's bound; return the timings."""
    first = next(iter(runs.values()))
    timer = ForwardTimer(first.probe.clock)
    timer.measure(first.trainer, {(c.batch, c.kind) for r in records for c in r["calls"] if c.phase in ("rollout", "update")})
    for r in records:
        r.update(iteration_bound(r.pop("calls"), timer, r["reward_s"]))
    return timer.table


def bench_cells(backend: str, cells: list[str], passes: int, log: Callable[[str], None]) -> tuple[dict[str, CellRun], list[dict]]:
    """Every cell's trainer built and warmed up, then ``passes`` x :data:`RUN_STEPS` iterations, the cells
    interleaved at each iteration so that changes in the machine's load hit every cell alike; after each
    pass the forward timings for its bounds. Returns the runs and the forward timings of every pass."""
    forward: list[dict] = []
    with contextlib.ExitStack() as stack:
        runs = {c: start_cell(backend, c, stack.enter_context(tempfile.TemporaryDirectory())) for c in cells}
        log(f"{backend}: {len(cells)} cells built and warmed up")
        for p in range(passes):
            for step in RUN_STEPS:
                for run in runs.values():
                    with run.probe.installed():
                        run.records.append({**run.probe.iteration(step), "pass": p})
            table = attach_bounds(runs, [r for run in runs.values() for r in run.records if r["pass"] == p])
            forward += [{"pass": p, "batch": b, "kind": k, "seconds": t} for (b, k), t in sorted(table.items())]
            log(f"{backend}: pass {p + 1}/{passes} done")
    for cell, run in runs.items():
        if any(r["group_size"] != GROUP_SIZE for r in run.records):
            raise RuntimeError(f"{backend}/{cell}: group size {run.records[0]['group_size']}, the benchmark compares K = {GROUP_SIZE}")
    return runs, forward


def summarize_cell(records: list[dict], run: dict, memory_mb: dict[str, float]) -> dict[str, float]:
    """Median and spread over repetitions (passes); a repetition's value is its mean over the run's iterations."""
    passes = sorted({r["pass"] for r in records})
    per_pass = {k: [float(np.mean([r[k] for r in records if r["pass"] == p])) for p in passes]
                for k in ("iter_s", "iter_wall_s", "rollout_s", "reward_s", "update_s", "bound_s", "recompute_s")}
    eff = [b / t for b, t in zip(per_pass["bound_s"], per_pass["iter_s"])]
    mean = lambda k: float(np.mean([r[k] for r in records]))  # noqa: E731
    return {
        "iter_s_median": float(np.median(per_pass["iter_s"])),
        "iter_s_spread": float((max(per_pass["iter_s"]) - min(per_pass["iter_s"])) / 2),
        "iter_wall_s_median": float(np.median(per_pass["iter_wall_s"])),
        **{f"{k}_median": float(np.median(per_pass[k])) for k in ("rollout_s", "reward_s", "update_s", "recompute_s")},
        "nfe_sample": mean("nfe_sample"), "nfe_grad": mean("nfe_grad"),
        "nfe_nograd_update": mean("nfe_nograd_update"), "nfe_ref": mean("nfe_ref"),
        "optimizer_steps": mean("optimizer_steps"), "edges_per_prompt": mean("edges_per_prompt"),
        **memory_mb,
        "bound_s": float(np.median(per_pass["bound_s"])), "efficiency": float(np.median(eff)),
        **run,
    }


def add_ratios(cells: dict[str, dict]) -> None:
    for ref, key in (("flow_grpo", "ratio_to_flow_grpo"), ("tmpo", "ratio_to_tmpo")):
        for row in cells.values():
            row[key] = row["iter_s_median"] / cells[ref]["iter_s_median"] if ref in cells else float("nan")


# --- TMPO's update memory versus K ------------------------------------------------------------------
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def allocate_large_blocks_by_mmap(threshold: int = 64 * 1024) -> bool:
    """Make glibc serve every block above ``threshold`` bytes by mmap and unmap it on free.

    By default the threshold grows to the largest block freed so far, and later blocks of that size come
    from the heap, where freed memory stays resident: RSS then counts the allocator's fragmentation,
    which grows with the number of chunks, not the live tensors. Only the memory sweep sets this (it
    slows allocation), and it stays set for the rest of the process."""
    with contextlib.suppress(OSError, AttributeError):
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    return False


def k_sweep_in_fresh_process(backend: str, chunks: tuple[int, ...]) -> list[dict[str, float]]:
    """:func:`k_sweep` in a new process, whose heap holds nothing but the sweep's own allocations."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(k_sweep, (backend, chunks))


def k_sweep(backend: str, chunks: tuple[int, ...]) -> list[dict[str, float]]:
    """TMPO's update peak memory at K = 9, 27, 81 (fixed branch positions) for each fixed parent chunk."""
    torch.set_num_threads(1)
    allocate_large_blocks_by_mmap()
    rows = []
    for chunk in chunks:
        for k, positions in K_SWEEP.items():
            with tempfile.TemporaryDirectory() as d:
                extra = ["method=tmpo", "ablation=fixed_branching", f"sampler.plan.fixed_positions=[{','.join(map(str, positions))}]",
                         f"trainer.parent_chunk={chunk}"]
                trainer = build_trainer(compose_config(cell_overrides(backend, extra, d)))
                torch.set_num_threads(1)
                device = trainer.policy.device
                probe = Probe(trainer, Clock(device), Memory(device), trim_before_update=True)
                with probe.installed():
                    probe.iteration(WARMUP_STEP)
                    rec = probe.iteration(WARMUP_STEP + 1)
                if rec["group_size"] != k:
                    raise RuntimeError(f"positions {positions} gave K = {rec['group_size']}, expected {k}")
                largest = max((c.batch for c in rec["calls"] if c.kind == "fwd_bwd"), default=0)
                rows.append({"parent_chunk": chunk, "K": k, "grad_rows_per_step": rec["nfe_grad"] * PROMPTS / rec["optimizer_steps"],
                             "largest_grad_batch": largest, "update_delta_mb": rec["update_delta_mb"],
                             "update_peak_mb": rec["update_peak_mb"], "update_s": rec["update_s"], "iter_s": rec["iter_s"]})
                print(f"  K sweep chunk={chunk} K={k}: update +{rec['update_delta_mb']:.1f} MB", flush=True)
                del trainer, probe
            release_memory()
    return rows


# --- paper numbers, machine --------------------------------------------------------------------------
def paper_ratios() -> dict[str, dict[str, float]]:
    """``{cell: {"to_flow_grpo", "to_tmpo"}}`` from the paper's iteration times (:data:`PAPER_ROWS`); {} if no table."""
    path = next((p for p in PAPER_CSVS if p.exists()), None)
    if path is None:
        return {}
    with path.open() as f:
        times = {(r["table"], r["method"]): float(r["value"]) for r in csv.DictReader(f)
                 if r["metric"] == "time_s" and r["protocol"] == PAPER_PROTOCOL and r["model"] == "flux1_dev"}
    t = {cell: times[row] for cell, row in PAPER_ROWS.items() if row in times}
    return {c: {"to_flow_grpo": v / t["flow_grpo"], "to_tmpo": v / t["tmpo"]} for c, v in t.items()}


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "cuda": torch.cuda.is_available(),
            "commit": commit or "unknown", "date": time.strftime("%Y-%m-%d %H:%M %Z")}


# --- the Markdown report ---------------------------------------------------------------------------
def _f(x: float, digits: int = 2) -> str:
    if x is None or not np.isfinite(x):
        return "-"
    return f"{x:.{digits}f}" if abs(x) >= 10 ** -digits or x == 0 else f"{x:.2g}"


def backend_table(cells: dict[str, dict], paper: dict[str, dict[str, float]]) -> list[str]:
    head = ("| method | s / iter | ± | wall s / iter | rollout | decode + reward | update | ÷ Flow-GRPO | paper | ÷ TMPO | paper "
            "| NFE sample | NFE update no-grad | NFE grad | NFE ref | peak MB | bound s | efficiency |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for cell, r in cells.items():
        p = paper.get(cell, {})
        lines.append(
            f"| {LABELS[cell]} | {_f(r['iter_s_median'], 3)} | {_f(r['iter_s_spread'], 3)} | {_f(r['iter_wall_s_median'], 3)} "
            f"| {_f(r['rollout_s_median'], 3)} | {_f(r['reward_s_median'], 3)} | {_f(r['update_s_median'], 3)} "
            f"| {_f(r['ratio_to_flow_grpo'])} | {_f(p.get('to_flow_grpo', float('nan')))} | {_f(r['ratio_to_tmpo'])} "
            f"| {_f(p.get('to_tmpo', float('nan')))} | {r['nfe_sample']:.1f} | {r['nfe_nograd_update']:.1f} | {r['nfe_grad']:.1f} "
            f"| {r['nfe_ref']:.1f} | {r['peak_mem_mb']:.0f} | {_f(r['bound_s'], 3)} | {_f(r['efficiency'])} |"
        )
    return lines


def headline(summary: dict[str, dict], paper: dict[str, dict[str, float]]) -> list[str]:
    out = []
    for backend, cells in summary.items():
        t = cells.get("tmpo")
        if t is None:
            continue
        targets = backend == "mini"  # the issue's targets are set on mini
        parts = [f"TMPO efficiency {_f(t['efficiency'])}" + (" (target >= 0.8)" if targets else "")]
        for ref in ("flow_grpo", "treegrpo", "no_tree"):  # the paper's quoted ratios
            if ref in cells:
                quoted = 1 / paper[ref]["to_tmpo"] if ref in paper else float("nan")
                target = "; target <= 0.25" if targets and ref == "flow_grpo" else ""
                parts.append(f"TMPO / {LABELS[ref]} {_f(t['iter_s_median'] / cells[ref]['iter_s_median'])} (paper {_f(quoted)}{target})")
        out.append(f"- **{backend}**: " + "; ".join(parts))
    return out


def tree_explanation(backend: str, cells: dict[str, dict]) -> list[str]:
    """TMPO / TreeGRPO explained by each one's network evaluations (measured and over the whole run)."""
    if not {"tmpo", "treegrpo"} <= set(cells):
        return []
    t, g = cells["tmpo"], cells["treegrpo"]
    rows = ["| | TMPO | TreeGRPO | TMPO / TreeGRPO |", "|---|---|---|---|"]
    for label, key, digits in (
        ("sampling NFE / prompt, whole run (plans)", "nfe_sample_run", 1), ("sampling NFE / prompt, timed iterations", "nfe_sample", 1),
        ("stored model parents / prompt, whole run", "parents_run", 1), ("stored edges / prompt", "edges_per_prompt", 1),
        ("grad forwards / prompt / iteration", "nfe_grad", 1), ("reference forwards / prompt / iteration", "nfe_ref", 1),
        ("no-grad recompute / prompt / iteration", "nfe_nograd_update", 1), ("bound (s)", "bound_s", 3),
        ("rollout (s)", "rollout_s_median", 3), ("update (s)", "update_s_median", 3), ("decode + reward (s)", "reward_s_median", 3),
        ("measured iteration (s)", "iter_s_median", 3),
    ):
        ratio = t[key] / g[key] if g[key] else float("nan")
        rows.append(f"| {label} | {_f(t[key], digits)} | {_f(g[key], digits)} | {_f(ratio)} |")
    nfe_ratio = t["nfe_sample_run"] / g["nfe_sample_run"]
    text = (
        f"Both are 27-leaf trees storing {t['edges_per_prompt']:.0f} edges per prompt; their branch schedules differ. TMPO "
        f"draws its branch points along its curriculum (early steps first, later ones as training goes on; a branch at "
        f"step 1 is 3 independent initial noises, prior edges that need no network call), TreeGRPO branches in a 3-step "
        f"window that slides along the horizon. Over the whole {RUN_LENGTH}-iteration run (every iteration's plan) TMPO "
        f"samples {t['nfe_sample_run']:.1f} velocity evaluations per prompt per iteration and TreeGRPO "
        f"{g['nfe_sample_run']:.1f} (ratio {_f(nfe_ratio)}); each optimizer pass back-propagates through "
        f"{t['parents_run']:.1f} and {g['parents_run']:.1f} parent states per prompt (one forward per parent serves its 3 "
        f"child edges). Network evaluations alone (the bounds of the timed iterations) put TMPO / TreeGRPO at "
        f"{_f(t['bound_s'] / g['bound_s'])}; measured it is {_f(t['iter_s_median'] / g['iter_s_median'])} on {backend}."
    )
    if abs(nfe_ratio - 1) < 0.05:
        text += (" The paper's 0.86 does not follow from these two schedules: over a run they do about the same number "
                 "of network evaluations, so their iteration times agree to within what the evaluations explain.")
    return rows + ["", text]


def k_sweep_table(rows: list[dict]) -> list[str]:
    lines = ["| parent_chunk | K | grad rows / optimizer step | largest grad batch | update +MB | update peak MB | update s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['parent_chunk']} | {r['K']} | {r['grad_rows_per_step']:.0f} | {r['largest_grad_batch']} "
                     f"| {r['update_delta_mb']:.1f} | {r['update_peak_mb']:.0f} | {_f(r['update_s'], 3)} |")
    return lines


def k_sweep_reading(rows: list[dict]) -> list[str]:
    """One sentence per parent chunk that K = 27 and 81 both fill: how the update memory moved while K tripled."""
    out = []
    for chunk in sorted({r["parent_chunk"] for r in rows}):
        by_k = {r["K"]: r for r in rows if r["parent_chunk"] == chunk}
        a, b = by_k.get(27), by_k.get(81)
        if a and b and a["largest_grad_batch"] == b["largest_grad_batch"] == chunk:
            out.append(f"At parent_chunk = {chunk} (full for K = 27 and 81) tripling K takes the parents per optimizer step "
                       f"from {a['grad_rows_per_step']:.0f} to {b['grad_rows_per_step']:.0f} and the update's memory from "
                       f"{a['update_delta_mb']:.1f} to {b['update_delta_mb']:.1f} MB (x{b['update_delta_mb'] / a['update_delta_mb']:.2f}).")
        elif a and b:
            out.append(f"At parent_chunk = {chunk} the chunk is not full below K = 81 ({a['largest_grad_batch']} rows at K = 27, "
                       f"{b['largest_grad_batch']} at 81), so the update's memory grows with K until it is: "
                       f"{a['update_delta_mb']:.1f} -> {b['update_delta_mb']:.1f} MB.")
    return [" ".join(out), ""] if out else []


def optimizer_steps(summary: dict) -> str:
    cells = next(iter(summary.values()), {})
    return ", ".join(f"{LABELS[c]} {r['optimizer_steps']:.0f}" for c, r in cells.items())


def render(summary: dict, details: dict, paper: dict) -> str:
    m = details["machine"]
    lines = [
        "# Benchmark: every method against the lower bound of its network evaluations (`make bench`)", "",
        f"Written by `{' '.join(['python -m experiments.bench', *details['args'].split()])}` on {m['date']} (commit {m['commit']}), "
        f"{details['wall_minutes']:.1f} min in all. Machine: {m['cpu']}, {m['cores']} cores, **{m['threads']} thread**, "
        f"torch {m['torch']}, Python {m['python']}. **Other jobs shared this machine** (load average "
        f"{details['load_start']:.1f} at the start, {details['load_end']:.1f} at the end on {m['cores']} cores): times are "
        f"{details.get('clock', '-')}, which the sharing changes far less than the wall clock (the wall-clock column shows "
        f"what it did there); what remains is spread over all methods alike (see Setup). "
        f"Memory: {details.get('memory', '-')}.", "",
        f"Setup: K = {GROUP_SIZE}, {PROMPTS} prompts per iteration, each method's own config (optimizer steps per rollout: "
        f"{optimizer_steps(summary)}). One warm-up iteration, then {details['passes']} passes over "
        f"iterations {', '.join(map(str, RUN_STEPS))} of a {RUN_LENGTH}-iteration run (the same prompts and noise for every "
        f"method; spread over the run because the paper's times are averages over the run and the branch/window schedules "
        f"change the cost along it). s / iter: median over passes of each pass's mean; ±: half the range over passes. "
        f"Phases (rollout, decode + reward + advantages, update) are medians in the same clock. The cells run interleaved "
        f"(each timed iteration runs for every cell in turn), so changes in the machine's load hit all cells alike. "
        f"peak MB: a process running that cell alone = the process before any trainer (runtime and one-time caches) + "
        f"what building the cell's trainer added + the peak growth of its warm-up iteration (iteration 0) from a trimmed heap. NFE columns are per prompt "
        f"and iteration: sampling velocity evaluations, and the update's parent-state forwards without grad (recompute for "
        f"the optimizer steps after the first), with grad, and of the reference policy. bound = sum of the sampling calls' "
        f"t_fwd(b) + grad calls' t_fwd_bwd(b) + reference calls' t_ref(b) + the measured decode + reward time, with the "
        f"forward times measured on the same model at the batch sizes the iteration used (details.json); efficiency = "
        f"bound / measured, per pass (each pass's forward times are measured right after its iterations), median. Paper ratios: iteration times of the PickScore-only protocol on FLUX.1-dev "
        f"(Table 1; Table 2 for the ablations).", "",
        "## Headline", "", *headline(summary, paper), "",
    ]
    for backend, cells in summary.items():
        lines += [f"## {backend}", "", *backend_table(cells, paper), ""]
        if backend == "toy":
            lines += ["The toy's network is a 2-D MLP (tens of microseconds per call): the loop's Python bookkeeping, "
                      "not the network, sets its iteration time, hence the low efficiencies.", ""]
    for backend, cells in summary.items():
        expl = tree_explanation(backend, cells)
        if expl:
            lines += [f"## TMPO / TreeGRPO on {backend}: network evaluations", "", *expl, ""]
    if details["k_sweep"]:
        lines += [
            f"## TMPO's update memory versus K ({details['k_sweep_backend']})", "",
            "Fixed branch positions (K = 9: steps 1, 2; 27: 1, 2, 3; 81: 1, 2, 3, 4), 4 prompts, 2 optimizer steps, one "
            "iteration after a warm-up. update +MB: peak RSS during the update minus the RSS at its start, with freed heap "
            "pages returned first and every block above 64 KiB served by mmap (so RSS follows the live tensors, not the "
            "allocator's fragmentation); it is the update's own working memory (the rollout it reads grows with K and is "
            "allocated before). The grad forwards run on min(parent_chunk, parents per optimizer step) rows at a time.", "",
            *k_sweep_table(details["k_sweep"]), "", *k_sweep_reading(details["k_sweep"]),
        ]
    for backend, note in details["skipped"].items():
        lines += [f"Skipped {backend}: {note}", ""]
    lines += ["Files: summary.json (per backend and method), details.json (machine, forward times, K sweep), "
              "iterations.csv (every timed iteration, with the bound's parts), <backend>.csv (the summary as one row per "
              "method; iter_time_s is the CPU median, which experiments/run_suite.py budgets with). On a GPU, `python -m experiments.bench_real` "
              "times a full-size random-weight FLUX.1-dev transformer (gpu.md).", ""]
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------------------
def process_baseline_mb(backend: str, cell: str) -> float:
    """Memory of the process before any of the backend's trainers, after a throwaway trainer has done the
    one-time imports, caches and first-call initialisations (so that they are not charged to the first cell)."""
    with tempfile.TemporaryDirectory() as d:
        trainer = build_trainer(compose_config(cell_overrides(backend, CELLS[cell], d)))
        torch.set_num_threads(1)
        trainer.train_step(WARMUP_STEP)
        device = trainer.policy.device
        del trainer
    release_memory()
    return Memory(device).current()


def bench_backend(backend: str, cells: list[str], passes: int, t_start: float) -> tuple[dict, list[dict], dict]:
    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:5.0f} s] {msg}", flush=True)

    baseline = process_baseline_mb(backend, cells[0])
    runs, forward = bench_cells(backend, cells, passes, log)
    out, records = {}, []
    for cell, run in runs.items():
        memory = {"process_baseline_mb": baseline, "trainer_mb": run.trainer_mb, "iteration_growth_mb": run.warmup_growth_mb,
                  "peak_mem_mb": baseline + run.trainer_mb + run.warmup_growth_mb}
        out[cell] = summarize_cell(run.records, run_counts(run.trainer), memory)
        records += [{"backend": backend, "cell": cell, **r} for r in run.records]
        r = out[cell]
        log(f"{backend}/{cell}: {r['iter_s_median']:.3f} s/iter (wall {r['iter_wall_s_median']:.3f}), bound {r['bound_s']:.3f}, "
            f"efficiency {r['efficiency']:.2f}, peak {r['peak_mem_mb']:.0f} MB")
    device = next(iter(runs.values())).trainer.policy.device
    del runs
    release_memory()
    add_ratios(out)
    return out, records, {"forward_times": forward, "clock": Clock(device).name, "memory": Memory(device).name}


CSV_NAMES = {"no_tree": "tmpo_no_tree", "fixed_branching": "tmpo_fixed_branching"}  # the earlier files' method names
CSV_COLUMNS = {"iter_s_median": "iter_time_s", "iter_s_spread": "iter_time_s_spread", "iter_wall_s_median": "iter_wall_time_s",
               "rollout_s_median": "rollout_s", "reward_s_median": "reward_s", "update_s_median": "update_s",
               "nfe_sample": "nfe_sample", "nfe_nograd_update": "nfe_nograd_update", "nfe_grad": "nfe_grad", "nfe_ref": "nfe_ref",
               "edges_per_prompt": "edges_per_prompt", "peak_mem_mb": "peak_mem_mb", "bound_s": "bound_s", "efficiency": "efficiency"}


def write_backend_csvs(summary: dict[str, dict], out: Path) -> None:
    """``<backend>.csv``, one row per method (``iter_time_s``: CPU seconds per iteration, what a job with a
    core of its own takes), read by experiments/run_suite.py to budget the mini suite."""
    for backend, cells in summary.items():
        rows = [{"method": CSV_NAMES.get(c, c), **{new: r[old] for old, new in CSV_COLUMNS.items()}} for c, r in cells.items()]
        write_text_atomic(pd.DataFrame(rows).to_csv(index=False, float_format="%.5g"), out / f"{backend}.csv")


def write_iterations(records: list[dict], path: Path) -> None:
    write_text_atomic(pd.DataFrame(records).to_csv(index=False, float_format="%.6g"), path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="toy,mini,flux_tiny", help="comma-separated: " + ", ".join(BACKENDS))
    ap.add_argument("--cells", default=",".join(CELLS), help="comma-separated: " + ", ".join(CELLS))
    ap.add_argument("--passes", type=int, default=2, help="repetitions of the timed iterations")
    ap.add_argument("--k-sweep", default="mini", help="backend of TMPO's update-memory-versus-K sweep ('none' to skip)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    ap.add_argument("--render-only", action="store_true", help="rewrite README.md and <backend>.csv from --out's summary.json and details.json")
    args = ap.parse_args()
    if args.render_only:
        summary, details = (json.loads((args.out / f).read_text()) for f in ("summary.json", "details.json"))
        write_text_atomic(render(summary, details, details["paper_ratios"]), args.out / "README.md")
        write_backend_csvs(summary, args.out)
        return
    backends, cells = args.backends.split(","), args.cells.split(",")
    unknown = [b for b in backends if b not in BACKENDS] + [c for c in cells if c not in CELLS]
    if unknown or args.passes < 1 or (args.k_sweep != "none" and args.k_sweep not in BACKENDS):
        raise SystemExit(f"bad arguments: unknown {unknown or args.k_sweep!r} or --passes < 1; backends: {list(BACKENDS)}, cells: {list(CELLS)}")
    torch.set_num_threads(1)
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    summary: dict[str, dict] = {}
    details: dict[str, Any] = {"args": " ".join(sys.argv[1:]), "passes": args.passes, "run_steps": list(RUN_STEPS),
                               "run_length": RUN_LENGTH, "forward_times": {}, "skipped": {}, "k_sweep": []}
    records: list[dict] = []
    for backend in backends:
        model = BACKENDS[backend][0].split("=", 1)[1]
        if not (REPO / "conf" / "model" / f"{model}.yaml").exists():
            details["skipped"][backend] = f"conf/model/{model}.yaml does not exist yet"
            continue
        try:
            summary[backend], recs, extra = bench_backend(backend, cells, args.passes, t_start)
        except Exception as e:  # noqa: BLE001 - the tiny FLUX backend is optional; toy and mini must run
            if backend != "flux_tiny":
                raise
            details["skipped"][backend] = f"{type(e).__name__}: {e}"
            print(f"skipping {backend}: {details['skipped'][backend]}", flush=True)
            continue
        records += recs
        details["forward_times"][backend] = extra["forward_times"]
        details.setdefault("clock", extra["clock"])
        details.setdefault("memory", extra["memory"])
    if args.k_sweep != "none":
        details["k_sweep_backend"] = args.k_sweep
        details["k_sweep"] = k_sweep_in_fresh_process(args.k_sweep, K_SWEEP_CHUNKS)
    details.update(machine=machine(), wall_minutes=(time.perf_counter() - t_start) / 60,
                   load_start=load_start, load_end=os.getloadavg()[0])
    paper = paper_ratios()
    details["paper_ratios"] = paper
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(summary, args.out / "summary.json")
    write_json_atomic(details, args.out / "details.json")
    write_iterations(records, args.out / "iterations.csv")
    write_backend_csvs(summary, args.out)
    write_text_atomic(render(summary, details, paper), args.out / "README.md")
    print(f"wrote {args.out}/README.md, summary.json, details.json, iterations.csv in {details['wall_minutes']:.1f} min", flush=True)


if __name__ == "__main__":
    main()
