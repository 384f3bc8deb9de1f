"""The paper's claims about its tables, checked against ours (``claims.md``, written by ``make tables``).

Each claim is a relation between rows of one table block on one metric ("TMPO has the best LGMD",
"Flow-GRPO's LGMD is below the base model's", "w/o Tree Structure is slower than TMPO (Full)"), listed
in :data:`CLAIMS` with the paper's words. A relation *holds* only when the difference exceeds the bar:

- **seed bar**: twice the larger seed standard deviation of the two rows compared (ddof = 1). The
  untouched model has no seed spread; every row is evaluated on the same fixed evaluation noise, so the
  trained row's seed spread is the whole bar there. A trained row with fewer than two seeds has no
  spread yet: the verdict is pending.
- **paper bar** (preference scores only): the paper's own spread of the identical FLUX.1-dev base across
  its sections (PickScore 21.97-22.60, HPS-v2.1 0.292-0.310, ImageReward 1.099-1.121), as a share of
  its mean, times our base's score. Reported beside the verdict; it does not change it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from tmpo.results.layout import TABLES, TIME, read_paper_numbers

OTHERS = "others"  # ``against``: every other trained row of the block
VERDICTS = ("pending: no runs", "pending: < 2 seeds", "fails", "within spread", "holds")  # worst first


@dataclass(frozen=True)
class Claim:
    text: str  # the paper's statement, briefly, with where it is made
    settings: tuple[tuple[str, str], ...]  # (table, protocol) blocks it is made for
    metrics: tuple[str, ...]
    subjects: tuple[str, ...]  # row keys the claim is about
    better: bool = True  # the subjects are better (False: worse) than ``against``
    against: tuple[str, ...] | str = OTHERS  # row keys, "base", or OTHERS


_T1 = (("table1", "geneval"), ("table1", "ocr"), ("table1", "pickscore"))
_EVERY = (*_T1, ("table5", "joint"), ("table6", "pickscore"))
_GRPO = ("flow_grpo", "mixgrpo", "treegrpo")
CLAIMS: tuple[Claim, ...] = (
    Claim("TMPO achieves the best compositional accuracy (Sec. 5, GenEval only)", (_T1[0],), ("geneval",), ("tmpo",)),
    Claim("Flow-GRPO reaches the highest OCR accuracy (Sec. 5, OCR only)", (_T1[1],), ("ocr",), ("flow_grpo",)),
    Claim("TMPO obtains the best PickScore (Sec. 5, PickScore only)", (_T1[2],), ("pickscore",), ("tmpo",)),
    Claim("TMPO achieves the best HPS-v2.1 under joint training (Sec. 5, Table 5)", (("table5", "joint"),),
          ("hpsv21",), ("tmpo",)),
    Claim("TMPO achieves the best scores on all metrics on SD3.5-Medium (App., Table 6)", (("table6", "pickscore"),),
          ("hpsv21", "imagereward", "pickscore", "lgmd", "cosdiv", TIME), ("tmpo",)),
    Claim("TMPO has the best LGMD in every setting (Sec. 5)", _EVERY, ("lgmd",), ("tmpo",)),
    Claim("TMPO has the best Cos. Div. under each single reward (Sec. 5)", _T1, ("cosdiv",), ("tmpo",)),
    Claim("TMPO has the best iteration time, ~20% below TreeGRPO (Sec. 5)", _EVERY, (TIME,), ("tmpo",)),
    Claim("TMPO keeps LGMD positive (mini: above the base model's)", _EVERY, ("lgmd",), ("tmpo",), against=("base",)),
    Claim("GRPO-style baselines drive LGMD negative (mini: below the base model's)", _EVERY, ("lgmd",), _GRPO,
          better=False, against=("base",)),
    Claim("Fixed beta = 1 slows reward improvement (Table 2)", (("table2", "pickscore"),), ("pickscore",), ("beta1",),
          better=False, against=("full",)),
    Claim("Detailed balance lowers ImageReward and LGMD (Table 2)", (("table2", "pickscore"),),
          ("imagereward", "lgmd"), ("detailed_balance",), better=False, against=("full",)),
    Claim("Without the tree, iteration time rises by 81% (Table 2)", (("table2", "pickscore"),), (TIME,), ("no_tree",),
          better=False, against=("full",)),
    Claim("Fixed branching lowers diversity and raises iteration time (Table 2)", (("table2", "pickscore"),),
          ("lgmd", "cosdiv", TIME), ("fixed_branching",), better=False, against=("full",)),
)
PAPER_BAR_METRICS = ("hpsv21", "imagereward", "pickscore")


def compare(subject: tuple[float, float, int], other: tuple[float, float, int], higher_is_better: bool,
            other_is_base: bool = False) -> tuple[float, float]:
    """``(d, bar)``: the subject's advantage (positive = better) and the seed bar (module docstring).

    Each row is ``(mean, std over seeds, n seeds)``. ``bar`` is NaN when a trained row has < 2 seeds.
    """
    (ms, ss, ns), (mo, so, no) = subject, other
    d = (ms - mo) if higher_is_better else (mo - ms)
    spreads = [ss if ns >= 2 else math.nan] + ([] if other_is_base else [so if no >= 2 else math.nan])
    return d, 2.0 * max(spreads) if not any(math.isnan(s) for s in spreads) else math.nan


def verdict(d: float, bar: float, better: bool) -> str:
    """"holds" / "fails" when ``d`` clears the bar in the claimed / opposite direction, else "within spread"."""
    if math.isnan(d):
        return "pending: no runs"
    if math.isnan(bar):
        return "pending: < 2 seeds"
    signed = d if better else -d
    return "holds" if signed > bar else "fails" if signed < -bar else "within spread"


def paper_bar_shares(paper: dict | None = None) -> dict[str, float]:
    """Per preference metric: (max - min) / mean of the paper's FLUX.1-dev base over its sections."""
    paper = read_paper_numbers() if paper is None else paper
    flux = {name for name, spec in TABLES.items() if spec.base_row and spec.paper_model == "FLUX.1-dev"}
    out = {}
    for metric in PAPER_BAR_METRICS:
        values = [v for (table, _, method, m), v in paper.items() if method == "base" and m == metric and table in flux]
        out[metric] = (max(values) - min(values)) / (sum(values) / len(values))
    return out


def _row(df: pd.DataFrame | None, protocol: str, row: str) -> pd.Series | None:
    if df is None:
        return None
    hit = df[(df["protocol"] == protocol) & (df["row"] == row)]
    return hit.iloc[0] if len(hit) else None


def _stats(line: pd.Series | None, metric: str) -> tuple[float, float, int]:
    if line is None or int(line["n_seeds"]) == 0 or pd.isna(line[metric]):
        return math.nan, math.nan, 0
    return float(line[metric]), float(line[f"{metric}_std"]), int(line["n_seeds"])


def _base_value(tables: dict[str, pd.DataFrame], table: str, protocol: str, metric: str) -> float:
    """The untouched model's score for the block; a table without a base row (Table 2) takes the one of the
    table its rows are read from (Table 1, same protocol)."""
    spec = TABLES[table]
    if not spec.base_row:
        table = next(r.source[0] for r in spec.block(protocol).rows if r.source)
    return _stats(_row(tables.get(table), protocol, "base"), metric)[0]


def _check(claim: Claim, tables: dict[str, pd.DataFrame], table: str, protocol: str, metric: str,
           subject: str, shares: dict[str, float]) -> dict:
    spec = TABLES[table]
    column = next(c for c in spec.columns if c.metric == metric)
    df = tables.get(table)
    rows = spec.block(protocol).rows
    against = [r.key for r in rows if r.key != subject] if claim.against == OTHERS else list(claim.against)
    own = _stats(_row(df, protocol, subject), metric)
    results = []
    for other in against:
        stats = _stats(_row(df, protocol, other), metric)
        d, bar = compare(own, stats, not column.lower_is_better, other_is_base=other == "base")
        results.append((other, d, bar, verdict(d, bar, claim.better)))
    # The line shows the comparison that decides: the worst verdict, and within it the smallest margin in
    # the claimed direction (for "best": the runner-up).
    sign = 1.0 if claim.better else -1.0
    other, d, bar, word = min(results, key=lambda r: (VERDICTS.index(r[3]), 0.0 if math.isnan(r[1]) else sign * r[1]))
    base = _base_value(tables, table, protocol, metric)
    paper_bar = shares[metric] * abs(base) if metric in shares and not math.isnan(base) else math.nan
    return {"claim": claim.text, "table": table, "protocol": protocol, "metric": metric, "row": subject,
            "against": other, "row_value": own[0], "row_seeds": own[2], "d": d, "seed_bar": bar,
            "paper_bar": paper_bar, "verdict": word}


def check_claims(tables: dict[str, pd.DataFrame], paper: dict | None = None) -> pd.DataFrame:
    """One line per (claim, block, metric, subject row): the deciding comparison and its verdict.

    ``tables``: :func:`tmpo.results.aggregate.build_tables`' output (tables without runs may be absent).
    ``d`` is the subject's advantage over ``against`` (positive = better on that metric).
    """
    shares = paper_bar_shares(paper)
    lines = [_check(claim, tables, table, protocol, metric, subject, shares)
             for claim in CLAIMS for table, protocol in claim.settings
             for metric in claim.metrics for subject in claim.subjects]
    return pd.DataFrame(lines)


def _num(v: float, fmt: str) -> str:
    return "—" if math.isnan(v) else format(v, fmt)


def to_markdown(claims: pd.DataFrame, scale: str, source: str) -> str:
    """``claims.md``: per claim, a line per block/metric/row with the deciding comparison and the verdict."""
    counts = claims["verdict"].value_counts()
    summary = ", ".join(f"{counts.get(k, 0)} {k}" for k in reversed(VERDICTS))
    out = [f"# The paper's claims on our tables ({scale})", "",
           f"Generated by `make tables` (`python -m tmpo.results`) from `{source}`; do not edit. "
           "Rules: `tmpo/results/claims.py`. A relation holds when the difference exceeds the seed bar (twice the "
           "larger seed sd of the two rows); the paper bar (its base model's spread across sections, as a share of "
           "our base score) is shown for the preference scores.", "", f"Verdicts: {summary}.", ""]
    for text, group in claims.groupby("claim", sort=False):
        out += [f"## {text}", "", "| block | metric | row | value (n) | vs | Δ (+ = better) | seed bar | paper bar | verdict |",
                "|---|---|---|---|---|---|---|---|---|"]
        for _, r in group.iterrows():
            value = _num(r["row_value"], ".3f") + ("" if math.isnan(r["row_value"]) else f" ({r['row_seeds']})")
            out.append(f"| {r['table']}/{r['protocol']} | {r['metric']} | {r['row']} | {value} | {r['against']} | "
                       f"{_num(r['d'], '+.3f')} | {_num(r['seed_bar'], '.3f')} | {_num(r['paper_bar'], '.3f')} | "
                       f"{r['verdict']} |")
        out.append("")
    return "\n".join(out)
