"""The paper's Fig. 4 (task reward vs wall-clock) and Fig. 6 (normalised reward vs LGMD and vs iteration
time) from the runs and the built tables."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from tmpo.results.layout import METHOD_ROWS, TIME  # noqa: E402
from tmpo.results.runs import RunRecord  # noqa: E402

COLORS = {"flow_grpo": "tab:blue", "mixgrpo": "tab:orange", "treegrpo": "tab:green", "gardo": "tab:purple",
          "tmpo": "tab:red"}
NAMES = {r.key: r.name for r in METHOD_ROWS}
FIG4_BLOCKS = (("geneval", "(a) GenEval (composition)"), ("ocr", "(b) OCR (text rendering)"),
               ("pickscore", "(c) PickScore (preference)"))
REWARD_METRICS = ("geneval", "ocr", "hpsv21", "imagereward", "pickscore")  # Fig. 6's "reward scores"


def _save_png(fig, path: Path) -> Path:
    """Write atomically, without a timestamp in the metadata, so an unchanged figure is byte-identical."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, metadata={"Software": None})
    plt.close(fig)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return path


def reward_curve(runs: list[RunRecord], window: int) -> pd.DataFrame:
    """Mean over seeds, by iteration, of the cumulative training wall-clock (minutes) and the training
    reward smoothed over ``window`` iterations; ``reward_std`` is the spread over seeds."""
    per_seed = []
    for r in runs:
        h = r.history
        per_seed.append(pd.DataFrame({
            "step": h.step.to_numpy(),
            "minutes": h.iter_time_s.cumsum().to_numpy() / 60.0,
            "reward": h["train/reward_mean"].rolling(window, min_periods=1).mean().to_numpy(),
        }))
    df = pd.concat(per_seed).groupby("step")
    return pd.DataFrame({"minutes": df.minutes.mean(), "reward": df.reward.mean(),
                         "reward_std": df.reward.std(ddof=1).fillna(0.0)}).reset_index()


def fig4(records: list[RunRecord], scale: str, out: Path) -> Path | None:
    """Training reward vs wall-clock training time, one panel per single-reward protocol of Table 1,
    one curve per method (mean over seeds, shaded +/- std). ``None`` if Table 1 has no runs."""
    runs = [r for r in records if r.labels.get("table") == "table1" and r.finished and r.labels.get("scale") == scale]
    blocks = [(p, t) for p, t in FIG4_BLOCKS if any(r.labels.get("protocol") == p for r in runs)]
    if not blocks:
        return None
    fig, axes = plt.subplots(1, len(blocks), figsize=(4.2 * len(blocks), 3.4), squeeze=False)
    for ax, (protocol, title) in zip(axes[0], blocks):
        for row in METHOD_ROWS:
            mine = [r for r in runs if r.labels.get("protocol") == protocol and r.labels.get("row") == row.key]
            if not mine:
                continue
            c = reward_curve(mine, window=max(1, len(mine[0].history) // 10))
            ax.plot(c.minutes, c.reward, color=COLORS[row.key], label=f"{row.name} ({len(mine)})", lw=1.4)
            ax.fill_between(c.minutes, c.reward - c.reward_std, c.reward + c.reward_std, color=COLORS[row.key], alpha=0.15)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training wall-clock (min)")
        ax.set_ylabel("training reward")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, title="method (seeds)", title_fontsize=7)
    fig.suptitle(f"Fig. 4 ({scale}): training reward (moving mean over 10% of the run) vs training wall-clock, "
                 "mean ± std over seeds", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return _save_png(fig, out)


def normalised_points(table1: pd.DataFrame, suffix: str = "") -> pd.DataFrame:
    """Fig. 6's points: per Table 1 block, each reward metric min-max normalised across the five methods,
    averaged per method; then, per method, the mean over blocks of that score, of LGMD and of the time.

    ``suffix`` = ``""`` for ours, ``"_paper"`` for the paper's numbers."""
    trained = table1[table1.row != "base"]
    rows = []
    for protocol, block in trained.groupby("protocol", sort=False):
        scores = []
        for m in REWARD_METRICS:
            v = block[m + suffix]
            if v.isna().any():
                continue
            span = v.max() - v.min()
            scores.append((v - v.min()) / span if span > 0 else v * 0 + 0.5)
        score = pd.concat(scores, axis=1).mean(axis=1) if scores else block[TIME + suffix] * np.nan
        rows.append(pd.DataFrame({"protocol": protocol, "row": block.row, "score": score,
                                  "lgmd": block["lgmd" + suffix], TIME: block[TIME + suffix]}))
    df = pd.concat(rows)
    return df.groupby("row", sort=False)[["score", "lgmd", TIME]].mean().reset_index()


def fig6(tables: dict[str, pd.DataFrame], scale: str, out: Path) -> Path | None:
    """Normalised reward score vs LGMD (left) and vs iteration time (right); ours on top, the paper's
    numbers below. ``None`` without Table 1."""
    if "table1" not in tables:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(8.4, 6.6))
    for i, (suffix, who) in enumerate((("", f"ours ({scale})"), ("_paper", "paper (FLUX.1-dev)"))):
        pts = normalised_points(tables["table1"], suffix)
        for j, (x, xlabel) in enumerate((("lgmd", "LGMD (diversity) →"), (TIME, "← iteration time (s)"))):
            ax = axes[i][j]
            for p in pts.itertuples():
                ax.scatter(getattr(p, x), p.score, color=COLORS[p.row], s=40, label=NAMES[p.row], zorder=3)
                ax.annotate(NAMES[p.row], (getattr(p, x), p.score), fontsize=6, xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel("normalised reward score", fontsize=8)
            ax.set_title(who, fontsize=9)
            ax.grid(alpha=0.3)
    fig.suptitle(f"Fig. 6 ({scale}): reward (min-max normalised per metric across methods, mean over "
                 f"{len(tables['table1'].protocol.unique())} Table 1 blocks) vs diversity and cost", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return _save_png(fig, out)

