"""``python -m tmpo.results`` (``make tables``): the paper's Tables 1, 2, 5, 6 and Figs. 4, 6 from runs.

    python -m tmpo.results --scale mini                        # committed run records in results/mini/records
    python -m tmpo.results --scale mini --runs runs/mini --skip-unfinished --partial   # a suite in progress
    python -m tmpo.results --scale paper --source wandb --wandb <entity>/<project>      # a wandb project

Writes ``<out>/table{1,2,5,6}.{md,csv,tex}`` (each table that has runs), ``runs.csv`` (one line per
run), ``claims.md`` (the paper's claims checked on these tables), ``fig4.png`` and ``fig6.png``; ``<out>`` defaults to ``results/<scale>``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tmpo.checkpoint import write_text_atomic
from tmpo.results import claims
from tmpo.results.aggregate import Options, ResultsError, build_tables, per_run_frame
from tmpo.results.figures import fig4, fig6
from tmpo.results.layout import TABLES
from tmpo.results.render import write_table
from tmpo.results.runs import LocalRuns, RunSource, WandbRuns


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tmpo.results", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default="mini", help="the runs' scale label (mini | paper); one scale per call")
    ap.add_argument("--source", choices=("local", "wandb"), default="local")
    ap.add_argument("--runs", type=Path, help="local: root of the run directories (default results/<scale>/records)")
    ap.add_argument("--wandb", metavar="ENTITY/PROJECT", help="wandb: the project to read")
    ap.add_argument("--filters", default="{}",
                    help='wandb: extra MongoDB-style run filters as JSON (always: {"tags": {"$in": [<scale>]}})')
    ap.add_argument("--out", type=Path, help="output directory (default results/<scale>)")
    ap.add_argument("--tables", nargs="+", choices=list(TABLES), help="only these tables (each must have runs)")
    ap.add_argument("--partial", action="store_true", help="write tables with missing rows (empty cells)")
    ap.add_argument("--allow-mixed-commits", action="store_true", help="accept runs from several git commits")
    ap.add_argument("--skip-unfinished", action="store_true", help="ignore unfinished runs instead of failing")
    return ap.parse_args(argv)


def make_source(args: argparse.Namespace, wandb_api=None) -> tuple[RunSource, str]:
    """The run reader the arguments name (``wandb_api``: a stand-in for ``wandb.Api()``, for tests)."""
    if args.source == "wandb":
        if not args.wandb:
            raise SystemExit("--source wandb needs --wandb <entity>/<project> (make tables SOURCE=wandb WANDB=<e>/<p>)")
        filters = {"tags": {"$in": [args.scale]}, **json.loads(args.filters)}
        return WandbRuns(args.wandb, filters, api=wandb_api), f"wandb:{args.wandb}"
    root = args.runs or Path("results") / args.scale / "records"
    return LocalRuns(root), str(root)


def main(argv: list[str] | None = None, wandb_api=None) -> int:
    args = parse_args(argv)
    source, where = make_source(args, wandb_api)
    out = args.out or Path("results") / args.scale
    opts = Options(args.scale, partial=args.partial, allow_mixed_commits=args.allow_mixed_commits,
                   skip_unfinished=args.skip_unfinished)
    try:
        records = source.records()
        tables = build_tables(records, opts, args.tables)
    except (ResultsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not tables:
        print(f"error: no finished runs with scale={args.scale} and a table label in {where}", file=sys.stderr)
        return 1
    written = []
    for name, df in tables.items():
        written += write_table(df, TABLES[name], args.scale, out, where)
    written.append(write_text_atomic(per_run_frame(records, opts).to_csv(index=False, float_format="%.6g",
                                                                         lineterminator="\n"), out / "runs.csv"))
    written.append(write_text_atomic(claims.to_markdown(claims.check_claims(tables), args.scale, where),
                                      out / "claims.md"))
    written += [p for p in (fig4(records, args.scale, out / "fig4.png"), fig6(tables, args.scale, out / "fig6.png")) if p]
    skipped = [t for t in TABLES if t not in tables]
    print(f"{len(records)} runs read from {where}; wrote {len(written)} files to {out}: "
          + ", ".join(p.name for p in written) + (f" (no runs for {', '.join(skipped)})" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
