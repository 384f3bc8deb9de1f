"""The paper's table layouts (Tables 1, 2, 5, 6): blocks, rows, columns, and the paper's own numbers.

A table is a list of blocks (one per training protocol), each a list of rows; a row is read from the
runs labelled ``(table, protocol, row)`` -- or, for Table 2's "TMPO (Full)", from Table 1's PickScore
TMPO runs, as the paper does (it prints the same numbers for both).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

PAPER_CSV = Path(__file__).resolve().parents[2] / "results" / "reference" / "paper_tables.csv"
TIME = "time_s"  # iteration time: mean wall-clock seconds per training iteration over the run (App. D.6)


@dataclass(frozen=True)
class Column:
    metric: str  # a summary.json name (``base/<metric>`` for the base row) or TIME
    header: str
    lower_is_better: bool = False
    decimals: int = 3


@dataclass(frozen=True)
class Row:
    key: str  # the runs' ``row`` label (conf/experiment/row/<key>.yaml); "base" = the untouched model
    name: str
    paper: str  # the row's ``method`` in paper_tables.csv
    method: str = "tmpo"  # what the runs must have run (checked: a stray ``method=`` override is an error)
    ablation: str = "full"
    source: tuple[str, str] | None = None  # (table, row) to read instead, same protocol


@dataclass(frozen=True)
class Block:
    protocol: str
    title: str
    rows: tuple[Row, ...]


@dataclass(frozen=True)
class TableSpec:
    name: str  # table1 ...
    caption: str
    columns: tuple[Column, ...]
    blocks: tuple[Block, ...]
    base_row: bool  # print the untouched model's evaluation (``base/<metric>``) first in each block
    paper_model: str  # the paper's backbone, for the base row's name

    def block(self, protocol: str) -> Block:
        return next(b for b in self.blocks if b.protocol == protocol)


BASE = Row("base", "base model", "base")
METHOD_ROWS = (
    Row("flow_grpo", "Flow-GRPO", "flow_grpo", method="flow_grpo"),
    Row("mixgrpo", "MixGRPO", "mixgrpo", method="mixgrpo"),
    Row("treegrpo", "TreeGRPO", "treegrpo", method="treegrpo"),
    Row("gardo", "GARDO", "gardo", method="gardo"),
    Row("tmpo", "TMPO (Ours)", "tmpo"),
)
ABLATION_ROWS = (
    Row("full", "TMPO (Full)", "tmpo", source=("table1", "tmpo")),
    Row("beta1", "w/o Reward Temp. β (β = 1)", "tmpo_beta1", ablation="beta1"),
    Row("detailed_balance", "Step-wise Balance (Detailed)", "tmpo_detailed_balance", ablation="detailed_balance"),
    Row("no_tree", "w/o Tree Structure (K = 27)", "tmpo_no_tree_k27", ablation="no_tree"),
    Row("fixed_branching", "w/o Dynamic Branching", "tmpo_fixed_branching", ablation="fixed_branching"),
)
_TIME = Column(TIME, "Time (s)", lower_is_better=True, decimals=2)
_PREFERENCE = (Column("hpsv21", "HPS-v2.1"), Column("imagereward", "ImgRwd"), Column("pickscore", "PickScore"))
_DIVERSITY = (Column("lgmd", "LGMD"), Column("cosdiv", "Cos. Div."))

TABLES: dict[str, TableSpec] = {
    "table1": TableSpec(
        "table1",
        "Task metric on the task's test prompts; preference scores and diversity on DrawBench(-style) prompts.",
        (_TIME, Column("geneval", "GenEval"), Column("ocr", "OCR Acc."), *_PREFERENCE, *_DIVERSITY),
        (Block("geneval", "Compositional Image Generation", METHOD_ROWS),
         Block("ocr", "Visual Text Rendering", METHOD_ROWS),
         Block("pickscore", "Human Preference Alignment", METHOD_ROWS)),
        base_row=True, paper_model="FLUX.1-dev"),
    "table2": TableSpec(
        "table2", "Ablations of TMPO under the PickScore only protocol.",
        (_TIME, *_PREFERENCE, *_DIVERSITY),
        (Block("pickscore", "PickScore only", ABLATION_ROWS),),
        base_row=False, paper_model="FLUX.1-dev"),
    "table5": TableSpec(
        "table5", "Joint preference training: HPS-v2.1, ImageReward and PickScore at equal weight.",
        (_TIME, *_PREFERENCE, *_DIVERSITY),
        (Block("joint", "Joint preference training", METHOD_ROWS),),
        base_row=True, paper_model="FLUX.1-dev"),
    "table6": TableSpec(
        "table6", "PickScore only training on SD3.5-Medium (mini: the mini MMDiT).",
        (_TIME, *_PREFERENCE, *_DIVERSITY),
        (Block("pickscore", "PickScore only", METHOD_ROWS),),
        base_row=True, paper_model="SD3.5-Medium"),
}
TASK_METRIC = {"geneval": "geneval", "ocr": "ocr", "pickscore": "pickscore", "joint": None}  # Fig. 4's y-axis


def base_name(spec: TableSpec, scale: str) -> str:
    """The base row's name: the paper's backbone, or its mini stand-in."""
    if scale == "mini":
        return "mini MMDiT (base)" if spec.paper_model.startswith("SD3.5") else "mini DiT (base)"
    return spec.paper_model


def read_paper_numbers(path: Path = PAPER_CSV) -> dict[tuple[str, str, str, str], float]:
    """``{(table, protocol, method, metric): value}`` from ``results/reference/paper_tables.csv``."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: it holds the paper's numbers (results/reference/README.md)")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    expected = {"table", "protocol", "model", "method", "metric", "value"}
    if not rows or set(rows[0]) != expected:
        raise ValueError(f"{path}: expected the columns {sorted(expected)}")
    return {(r["table"], r["protocol"], r["method"], r["metric"]): float(r["value"]) for r in rows}
