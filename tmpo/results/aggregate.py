"""From run records to the paper's tables: checks, per-run values, mean +/- std over seeds.

A table is refused (one :class:`ResultsError` listing every problem and its fix) when a run is
unfinished, two runs claim the same (table, protocol, row, seed), a run's method does not match its
row, the seeds of a row -- or the rows of a block -- were run with different settings, a row has no
runs, or the runs come from different git commits; the last three can be allowed explicitly.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from tmpo.config import EvalConfig, TrainerConfig
from tmpo.results.layout import TABLES, TIME, Row, TableSpec, read_paper_numbers
from tmpo.resume import flatten
from tmpo.results.runs import RunRecord

# Config keys that may differ between the seeds of one row: bookkeeping, not what a run computes.
# (run_suite evaluates the untouched model on the first seed only, so trainer.eval_base differs; lr_scales is
# a scale's lookup table, added after the first records: the factor a run used is trainer.lr_scale, compared.)
SEED_FREE = ("run_dir", "resume", "tags", "logger", "lr_scales", "trainer.seed", "trainer.eval_base", "trainer.progress",
             "trainer.checkpoint_every", "trainer.eval_every", "trainer.parent_chunk")
# Config keys every row of a block must share: one protocol, one model, one budget, one evaluation.
BLOCK_SHARED = ("model", "reward", "eval", "trainer.total_steps", "trainer.prompts_per_step", "trainer.threads")


class ResultsError(ValueError):
    """Runs that cannot make a table, with what is wrong with each and how to fix it."""


@dataclass(frozen=True)
class Options:
    scale: str
    partial: bool = False  # write tables with missing rows as "--" instead of failing
    allow_mixed_commits: bool = False
    skip_unfinished: bool = False  # ignore unfinished runs (e.g. a suite still running) instead of failing


def _drop(flat: dict[str, Any], prefixes: Iterable[str]) -> dict[str, Any]:
    prefixes = tuple(prefixes)
    return {k: v for k, v in flat.items() if not any(k == p or k.startswith(p + ".") for p in prefixes)}


def _keep(flat: dict[str, Any], prefixes: Iterable[str]) -> dict[str, Any]:
    prefixes = tuple(prefixes)
    return {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in prefixes)}


def _differences(configs: Mapping[str, dict[str, Any]], limit: int = 4) -> list[str]:
    """``key: value (run) vs value (run)`` for keys on which the flattened configs disagree."""
    keys = sorted(set().union(*configs.values()))
    out = []
    for k in keys:
        values = {rid: repr(c.get(k, "<absent>")) for rid, c in configs.items()}
        if len(set(values.values())) > 1:
            out.append(f"{k}: " + " vs ".join(f"{v} ({rid})" for rid, v in list(values.items())[:3]))
    return out[:limit] + ([f"... {len(out) - limit} more keys"] if len(out) > limit else [])


def run_values(record: RunRecord, metrics: Iterable[str]) -> dict[str, float]:
    """A run's table values: final metrics from its summary, ``base/<m>`` for the untouched model, and the
    iteration time (mean wall-clock seconds per training iteration over its whole history, App. D.6)."""
    summary = record.summary or {}
    out: dict[str, float] = {}
    for m in metrics:
        for key in (m, f"base/{m}"):
            if m == TIME and key == m:
                out[key] = float(record.history.iter_time_s.mean()) if not record.history.empty else math.nan
            elif summary.get(key) is not None:
                out[key] = float(summary[key])
            else:
                out[key] = math.nan
    return out


def _row_runs(spec: TableSpec, protocol: str, row: Row, by_key: dict) -> list[RunRecord]:
    table, key = row.source if row.source else (spec.name, row.key)
    return by_key.get((table, protocol, key), [])


def select_runs(records: Iterable[RunRecord], opts: Options) -> tuple[list[RunRecord], list[str]]:
    """The finished, labelled runs of ``opts.scale``; problems with unfinished or duplicated runs."""
    problems, keep, seen = [], [], defaultdict(list)
    for r in records:
        if r.labels.get("scale") != opts.scale or not r.labels.get("table"):
            continue
        if not r.finished:
            if not opts.skip_unfinished:
                problems.append(f"unfinished run {r.run_id}: {r.why_unfinished}; resume it "
                                "(python -m experiments.run_suite run <block>) or pass --skip-unfinished")
            continue
        seen[tuple(r.labels.get(k) for k in ("table", "protocol", "row", "seed"))].append(r)
        keep.append(r)
    for key, runs in seen.items():
        if len(runs) > 1:
            problems.append(f"{len(runs)} runs for table={key[0]} protocol={key[1]} row={key[2]} seed={key[3]}: "
                            + ", ".join(r.run_id for r in runs) + "; keep one (move the others out of the runs dir)")
    return keep, problems


@functools.cache
def _schema_defaults() -> dict[str, Any]:
    """The trainer and eval schemas' defaults, flattened (``trainer.noise_seeding`` -> ``"auto"``, ...)."""
    return flatten({"trainer": asdict(TrainerConfig()), "eval": asdict(EvalConfig())})


def _full_config(run: RunRecord) -> dict[str, Any]:
    """The run's flattened config, with the schema's default for every trainer/eval key it predates: a key
    is added with the default that does what the code did before it (e.g. ``trainer.noise_seeding=auto``
    is one process's batch seeding), so a record without it ran that default."""
    return {**_schema_defaults(), **flatten(run.config)}


def _check_block(spec: TableSpec, protocol: str, rows: dict[Row, list[RunRecord]], opts: Options) -> list[str]:
    problems = []
    for row, runs in rows.items():
        for r in runs:
            if (r.labels.get("method"), r.labels.get("ablation")) != (row.method, row.ablation):
                problems.append(f"run {r.run_id} is labelled row={r.labels.get('row')} but ran method="
                                f"{r.labels.get('method')} ablation={r.labels.get('ablation')} (expected {row.method}/"
                                f"{row.ablation}); choose rows with experiment/row=<row>, not method=/ablation=")
        configs = {r.run_id: _drop(_full_config(r), SEED_FREE) for r in runs}
        if len(configs) > 1 and _differences(configs):
            problems.append(f"{spec.name}/{protocol}/{row.key}: its seeds ran different settings: "
                            + "; ".join(_differences(configs)))
    shared = {r.run_id: _keep(_full_config(r), BLOCK_SHARED) for runs in rows.values() for r in runs}
    if len(shared) > 1 and _differences(shared):
        problems.append(f"{spec.name}/{protocol}: its rows ran different protocols/models/budgets: "
                        + "; ".join(_differences(shared)))
    commits = {r.labels.get("git_commit") for runs in rows.values() for r in runs}
    if len(commits) > 1 and not opts.allow_mixed_commits:
        listed = ", ".join(sorted(map(str, commits)))
        problems.append(f"{spec.name}/{protocol}: runs from {len(commits)} git commits ({listed}); "
                        "rerun the odd ones or pass --allow-mixed-commits (the table then lists each row's commits)")
    return problems


def _stats(values: list[float], where: str) -> tuple[float, float]:
    """Mean and std (ddof=1; nan for one value) of a metric over runs; all absent -> nan (the metric is not
    in this protocol); absent from only some runs -> an error, never a mean over fewer seeds."""
    arr = np.array(values, dtype=float)
    missing = np.isnan(arr)
    if missing.all():
        return math.nan, math.nan
    if missing.any():
        raise ResultsError(f"{where}: {int(missing.sum())} of {arr.size} runs lack this metric; rerun their "
                           "evaluation or remove them")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan


def _short(commit: Any) -> str:
    return str(commit)[:10]


def _line(spec: TableSpec, protocol: str, row: Row | None, runs: list[RunRecord], paper: dict) -> dict[str, Any]:
    """The table line of ``row`` (``None``: the base row, read from ``base/<metric>`` of the block's runs)."""
    metrics = [c.metric for c in spec.columns]
    per_run = [run_values(r, metrics) for r in runs]
    paper_key = row.paper if row else "base"
    out: dict[str, Any] = {"table": spec.name, "protocol": protocol, "row": row.key if row else "base",
                           "n_seeds": len({r.labels.get("seed") for r in runs})}
    for m in metrics:
        key = m if row else f"base/{m}"
        where = f"{spec.name}/{protocol}/{row.key if row else 'base'}: {key}"
        mean, std = (math.nan, math.nan) if row is None and m == TIME else _stats([v[key] for v in per_run], where)
        out[m], out[f"{m}_std"] = mean, std
        out[f"{m}_paper"] = paper.get((spec.name, protocol, paper_key, m), math.nan)
    commits = sorted({_short(r.labels.get("git_commit")) + ("+dirty" if r.labels.get("git_dirty") else "") for r in runs})
    out["git_commits"] = " ".join(commits)
    return out


def _where(spec: TableSpec, row: Row) -> str:
    table, key = row.source if row.source else (spec.name, row.key)
    return f"{table}/{key}"


def build_table(spec: TableSpec, records: list[RunRecord], opts: Options, paper: dict | None = None) -> pd.DataFrame | None:
    """One line per (protocol, row) in the paper's order; ``None`` if no run belongs to the table.

    Columns: ``table, protocol, row, n_seeds``, then per metric ``<m>``, ``<m>_std`` (over seeds, ddof=1)
    and ``<m>_paper``, and ``git_commits``. Raises :class:`ResultsError` listing every problem.
    """
    paper = read_paper_numbers() if paper is None else paper
    by_key: dict[tuple, list[RunRecord]] = defaultdict(list)
    for r in records:
        by_key[(r.labels.get("table"), r.labels.get("protocol"), r.labels.get("row"))].append(r)
    own = [r for r in records if r.labels.get("table") == spec.name]
    if not own:
        return None
    problems, lines = [], []
    for block in spec.blocks:
        rows = {row: sorted(_row_runs(spec, block.protocol, row, by_key), key=lambda r: str(r.labels.get("seed")).zfill(9))
                for row in block.rows}
        missing = [row for row, runs in rows.items() if not runs]
        if missing and not opts.partial:
            where = ", ".join(_where(spec, r) for r in missing)
            problems.append(f"{spec.name}/{block.protocol}: no runs for row(s) {where}; "
                            "run them (python -m experiments.run_suite run <block>) or pass --partial")
        present = {row: runs for row, runs in rows.items() if runs}
        problems += _check_block(spec, block.protocol, present, opts)
        all_runs = [r for runs in present.values() for r in runs]
        if spec.base_row and all_runs:
            with_base = [r for r in all_runs if (r.summary or {}).get(f"base/{spec.columns[-1].metric}") is not None]
            if not with_base and not opts.partial:
                problems.append(f"{spec.name}/{block.protocol}: no run evaluated the untouched model (base/<metric>); "
                                "run one seed with trainer.eval_base=true (run_suite does, on the first seed)")
            lines.append(_line(spec, block.protocol, None, with_base, paper))
        lines += [_line(spec, block.protocol, row, runs, paper) for row, runs in rows.items()]
    if problems:
        raise ResultsError(f"{spec.name} ({opts.scale}) cannot be built:\n  - " + "\n  - ".join(problems))
    return pd.DataFrame(lines)


def build_tables(records: list[RunRecord], opts: Options, names: Iterable[str] | None = None,
                 paper: dict | None = None) -> dict[str, pd.DataFrame]:
    """Every requested table that has runs (all four by default); problems of all tables in one error."""
    selected, problems = select_runs(records, opts)
    if problems:
        raise ResultsError("runs cannot be aggregated:\n  - " + "\n  - ".join(problems))
    paper = read_paper_numbers() if paper is None else paper
    out, errors = {}, []
    for name in names or TABLES:
        if name not in TABLES:
            raise ResultsError(f"unknown table {name!r}; known: {', '.join(TABLES)}")
        try:
            table = build_table(TABLES[name], selected, opts, paper)
        except ResultsError as e:
            errors.append(str(e))
            continue
        if table is not None:
            out[name] = table
        elif names:
            errors.append(f"{name}: no finished {opts.scale} runs are labelled table={name}")
    if errors:
        raise ResultsError("\n".join(errors))
    return out


def per_run_frame(records: list[RunRecord], opts: Options) -> pd.DataFrame:
    """One line per finished run of the scale: labels and every table metric (``runs.csv``)."""
    selected, _ = select_runs(records, Options(opts.scale, skip_unfinished=True))
    metrics = sorted({c.metric for t in TABLES.values() for c in t.columns})
    lines = []
    for r in selected:
        values = run_values(r, metrics)
        lines.append({**{k: r.labels.get(k) for k in ("table", "protocol", "row", "seed", "method", "ablation",
                                                      "experiment", "git_commit", "git_dirty")},
                      **{m: values[m] for m in metrics},
                      **{f"base/{m}": values[f"base/{m}"] for m in metrics if m != TIME}})
    df = pd.DataFrame(lines)
    return df.sort_values(["table", "protocol", "row", "seed"], ignore_index=True) if not df.empty else df
