"""The tables aggregator (tmpo.results) on hand-made run directories: hand-computed means and stds, the
paper's layout and numbers, every refusal (missing, duplicated, unfinished, mixed runs), determinism."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import yaml

from synthetic_runs import BASE, STEPS, write_block, write_mini_suite, write_run
from tmpo.results.__main__ import main
from tmpo.results.aggregate import Options, ResultsError, build_tables
from tmpo.results.labels import run_labels, wandb_identity
from tmpo.results.layout import METHOD_ROWS, TABLES, read_paper_numbers
from tmpo.results.render import to_latex, to_markdown
from tmpo.results.runs import LocalRuns, copy_run, slim_metrics

MINI = Options("mini")


def line(df: pd.DataFrame, protocol: str, row: str) -> pd.Series:
    sel = df[(df.protocol == protocol) & (df.row == row)]
    assert len(sel) == 1
    return sel.iloc[0]


@pytest.fixture
def suite(tmp_path):
    write_mini_suite(tmp_path)
    return tmp_path


def test_mean_std_over_seeds_and_iteration_time_from_the_history(suite):
    tables = build_tables(LocalRuns(suite).records(), MINI)
    assert set(tables) == {"table1", "table2", "table5", "table6"}
    t1 = tables["table1"]
    # TMPO is row index 4: metrics 0.9/1.0/1.1 over seeds -> mean 1.0, std 0.1; times: per-seed means 5, 6, 7
    tmpo = line(t1, "geneval", "tmpo")
    assert tmpo.n_seeds == 3
    assert tmpo.geneval == pytest.approx(1.0) and tmpo.geneval_std == pytest.approx(0.1)
    assert tmpo.time_s == pytest.approx(6.0) and tmpo.time_s_std == pytest.approx(1.0)  # not the summary's 99
    assert math.isnan(tmpo.ocr)  # a GenEval run has no OCR metric
    flow = line(t1, "ocr", "flow_grpo")  # row index 0: 0.5/0.6/0.7
    assert flow.ocr == pytest.approx(0.6) and flow.ocr_std == pytest.approx(0.1) and flow.time_s == pytest.approx(2.0)
    # the paper's numbers side by side
    assert tmpo.geneval_paper == pytest.approx(0.949) and tmpo.time_s_paper == pytest.approx(91.9)
    assert line(t1, "pickscore", "gardo").pickscore_paper == pytest.approx(23.959)
    # the base row: the untouched model's eval (base/<metric>), first seed of each row; no time
    base = line(t1, "geneval", "base")
    assert base.geneval == pytest.approx(BASE["geneval"]) and base.n_seeds == 1 and math.isnan(base.time_s)
    assert base.geneval_paper == pytest.approx(0.647)
    assert list(t1.row[t1.protocol == "geneval"]) == ["base"] + [r.key for r in METHOD_ROWS]  # the paper's order


def test_table2_full_row_is_table1_pickscore_tmpo_and_has_no_base_row(suite):
    tables = build_tables(LocalRuns(suite).records(), MINI)
    t2, t1 = tables["table2"], tables["table1"]
    assert list(t2.row) == ["full", "beta1", "detailed_balance", "no_tree", "fixed_branching"]
    full, tmpo = line(t2, "pickscore", "full"), line(t1, "pickscore", "tmpo")
    assert full.pickscore == tmpo.pickscore and full.time_s == tmpo.time_s and full.n_seeds == 3
    assert full.pickscore_paper == pytest.approx(24.277)
    assert line(t2, "pickscore", "no_tree").time_s_paper == pytest.approx(123.7)


def test_markdown_and_latex_bold_the_best_trained_row_and_print_the_paper(suite):
    t1 = build_tables(LocalRuns(suite).records(), MINI)["table1"]
    md = to_markdown(t1, TABLES["table1"], "mini", "results/mini/records")
    tmpo_line = next(ln for ln in md.splitlines() if ln.startswith("| TMPO (Ours)"))
    assert "**1.000** ± 0.100 (0.949)" in tmpo_line  # highest GenEval: TMPO
    flow_line = next(ln for ln in md.splitlines() if ln.startswith("| Flow-GRPO"))
    assert "**2.00** ± 1.00 (160.7)" in flow_line  # lowest time is best
    assert "*Compositional Image Generation*" in md and "*Human Preference Alignment*" in md
    base_line = next(ln for ln in md.splitlines() if ln.startswith("| mini DiT (base)"))
    assert "0.509 (0.647)" in base_line and "**" not in base_line  # the base row is never bold
    tex = to_latex(t1, TABLES["table1"], "mini")
    assert r"\textbf{1.000} {\scriptsize$\pm$0.100} {\scriptsize(0.949)}" in tex and r"\toprule" in tex


def test_cli_writes_every_table_and_figure_and_regenerates_byte_identically(suite, tmp_path):
    out = tmp_path / "out"
    assert main(["--scale", "mini", "--runs", str(suite), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"table{i}.{e}" for i in (1, 2, 5, 6) for e in ("md", "csv", "tex")]
                           + ["runs.csv", "claims.md", "fig4.png", "fig6.png"])
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["--scale", "mini", "--runs", str(suite), "--out", str(out)]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 6 * 5 * 3 - 5 * 3 + 4 * 3  # Table 2 has 4 rows of its own
    csv = pd.read_csv(out / "table1.csv")
    assert {"geneval", "geneval_std", "geneval_paper", "n_seeds", "name", "git_commits"} <= set(csv.columns)


def test_scales_are_never_mixed(tmp_path):
    write_block(tmp_path / "a", "table5", "joint")
    write_block(tmp_path / "b", "table5", "joint", scale="paper")
    records = LocalRuns(tmp_path).records()
    mini = build_tables(records, MINI)["table5"]
    paper = build_tables(records, Options("paper"))["table5"]
    assert line(mini, "joint", "tmpo").n_seeds == 3 and line(paper, "joint", "tmpo").n_seeds == 3
    assert build_tables(records, Options("nope")) == {}


def test_missing_rows_are_named_unless_partial(tmp_path):
    write_block(tmp_path, "table5", "joint", skip=("gardo",))
    with pytest.raises(ResultsError, match=r"table5/joint: no runs for row\(s\) table5/gardo.*--partial"):
        build_tables(LocalRuns(tmp_path).records(), MINI)
    t5 = build_tables(LocalRuns(tmp_path).records(), Options("mini", partial=True))["table5"]
    assert math.isnan(line(t5, "joint", "gardo").pickscore) and line(t5, "joint", "gardo").n_seeds == 0
    md = to_markdown(t5, TABLES["table5"], "mini", "x")
    gardo = next(ln for ln in md.splitlines() if ln.startswith("| GARDO"))
    assert gardo.startswith("| GARDO | 0 | — (125.9) | — (0.341)")
    assert "**Incomplete** (written with `--partial`): 1 of 5 trained rows have no runs yet; the others have 3 seed(s)" in md
    write_block(tmp_path / "whole", "table5", "joint")
    whole = build_tables(LocalRuns(tmp_path / "whole").records(), Options("mini", partial=True))["table5"]
    assert "Incomplete" not in to_markdown(whole, TABLES["table5"], "mini", "x")


def test_table2_without_table1_pickscore_names_where_full_comes_from(tmp_path):
    write_block(tmp_path, "table2", "pickscore")
    with pytest.raises(ResultsError, match="table1/tmpo"):
        build_tables(LocalRuns(tmp_path).records(), MINI)


def test_duplicated_runs_are_refused_with_both_paths(tmp_path):
    write_block(tmp_path, "table5", "joint")
    write_run(tmp_path, table="table5", protocol="joint", row="tmpo", seed=1, method="tmpo", dirname="copy/tmpo_s1")
    with pytest.raises(ResultsError, match=r"2 runs for table=table5 protocol=joint row=tmpo seed=1: .*copy/tmpo_s1"):
        build_tables(LocalRuns(tmp_path).records(), MINI)


def test_unfinished_runs_are_refused_unless_skipped(tmp_path):
    write_block(tmp_path, "table5", "joint", seeds=(0, 1))
    write_run(tmp_path, table="table5", protocol="joint", row="tmpo", seed=2, method="tmpo", finished=False)
    with pytest.raises(ResultsError, match=r"unfinished run .*tmpo/seed2: no final summary"):
        build_tables(LocalRuns(tmp_path).records(), MINI)
    t5 = build_tables(LocalRuns(tmp_path).records(), Options("mini", skip_unfinished=True))["table5"]
    assert line(t5, "joint", "tmpo").n_seeds == 2


def test_a_summary_short_of_total_steps_is_unfinished(tmp_path):
    run = write_run(tmp_path, table="table5", protocol="joint", row="tmpo", seed=0, method="tmpo")
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "steps": 2.0}))
    record = LocalRuns(tmp_path).read(run)
    assert not record.finished and "step 2.0 of 4" in record.why_unfinished


def test_repeated_steps_in_a_log_are_an_error(tmp_path):
    run = write_run(tmp_path, table="table5", protocol="joint", row="tmpo", seed=0, method="tmpo")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines + lines[-1:]) + "\n")
    with pytest.raises(ValueError, match=r"steps \[4\] are logged twice"):
        LocalRuns(tmp_path).read(run)


def test_mixed_git_commits_are_refused_unless_allowed(tmp_path):
    write_block(tmp_path, "table5", "joint", seeds=(0, 1))
    write_run(tmp_path, table="table5", protocol="joint", row="tmpo", seed=2, method="tmpo", git="beef")
    with pytest.raises(ResultsError, match=r"runs from 2 git commits \(beef, c0ffee\).*--allow-mixed-commits"):
        build_tables(LocalRuns(tmp_path).records(), MINI)
    t5 = build_tables(LocalRuns(tmp_path).records(), Options("mini", allow_mixed_commits=True))["table5"]
    assert line(t5, "joint", "tmpo").git_commits == "beef c0ffee"
    assert "several git commits" in to_markdown(t5, TABLES["table5"], "mini", "x")


def test_seeds_with_different_settings_are_refused(tmp_path):
    write_block(tmp_path, "table5", "joint", seeds=(0, 1))
    write_run(tmp_path, table="table5", protocol="joint", row="tmpo", seed=2, method="tmpo", lr=1e-3)
    with pytest.raises(ResultsError, match=r"table5/joint/tmpo: its seeds ran different settings: trainer.lr: 0.0003"):
        build_tables(LocalRuns(tmp_path).records(), MINI)


def test_a_key_added_later_matches_older_records_only_at_the_value_they_ran(tmp_path):
    """trainer.noise_seeding and eval.batch_size did not exist when the first records were made: a newer
    seed that has them at the old behaviour's value joins the row; another value is a different setting."""
    write_block(tmp_path, "table5", "joint", seeds=(0, 1))
    newer = write_run(tmp_path, table="table5", protocol="joint", row="tmpo", seed=2, method="tmpo")
    config = yaml.safe_load((newer / "config.yaml").read_text())
    config["trainer"]["noise_seeding"], config["eval"]["batch_size"] = "auto", None
    (newer / "config.yaml").write_text(yaml.safe_dump(config))
    build_tables(LocalRuns(tmp_path).records(), MINI)  # accepted
    config["trainer"]["noise_seeding"] = "group"
    (newer / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ResultsError, match=r"its seeds ran different settings: trainer.noise_seeding: 'auto'"):
        build_tables(LocalRuns(tmp_path).records(), MINI)


def test_a_runs_lr_factor_is_compared_not_the_scales_lookup_table(tmp_path):
    """Records made before conf/scale/mini.yaml's lr_scales have no such key; a newer seed that has the table
    joins the row when its trainer.lr_scale is the same, and is refused when it trained at another factor."""
    write_block(tmp_path, "table5", "joint", seeds=(0, 1))
    for seed in (0, 1):
        older = tmp_path / "table5_joint" / "tmpo" / f"seed{seed}" / "config.yaml"
        config = yaml.safe_load(older.read_text())
        config["trainer"]["lr_scale"] = 10.0
        older.write_text(yaml.safe_dump(config))
    newer = write_run(tmp_path, table="table5", protocol="joint", row="tmpo", seed=2, method="tmpo")
    config = yaml.safe_load((newer / "config.yaml").read_text())
    config["lr_scales"], config["trainer"]["lr_scale"] = {"tmpo": 10.0, "mixgrpo": 1.0}, 10.0
    (newer / "config.yaml").write_text(yaml.safe_dump(config))
    build_tables(LocalRuns(tmp_path).records(), MINI)  # accepted
    config["trainer"]["lr_scale"] = 3.0
    (newer / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ResultsError, match=r"its seeds ran different settings: trainer.lr_scale: 10.0"):
        build_tables(LocalRuns(tmp_path).records(), MINI)


def test_rows_of_a_block_with_different_budgets_are_refused(tmp_path):
    write_block(tmp_path, "table5", "joint", skip=("gardo",))
    for seed in (0, 1, 2):
        write_run(tmp_path, table="table5", protocol="joint", row="gardo", seed=seed, method="gardo", total_steps=6,
                  times=[1.0] * 6)
    with pytest.raises(ResultsError, match=r"table5/joint: its rows ran different .*trainer.total_steps: 4"):
        build_tables(LocalRuns(tmp_path).records(), MINI)


def test_a_row_label_that_ran_another_method_is_refused(tmp_path):
    write_block(tmp_path, "table5", "joint", skip=("tmpo",))
    for seed in (0, 1, 2):  # experiment/row=tmpo with a stray method=flow_grpo override
        write_run(tmp_path, table="table5", protocol="joint", row="tmpo", seed=seed, method="flow_grpo")
    with pytest.raises(ResultsError, match=r"labelled row=tmpo but ran method=flow_grpo.*experiment/row=<row>"):
        build_tables(LocalRuns(tmp_path).records(), MINI)


def test_a_block_without_a_base_evaluation_is_refused(tmp_path):
    for i, row in enumerate(METHOD_ROWS):
        for seed in (0, 1, 2):
            write_run(tmp_path, table="table5", protocol="joint", row=row.key, seed=seed, method=row.method,
                      eval_base=False)
    with pytest.raises(ResultsError, match="no run evaluated the untouched model"):
        build_tables(LocalRuns(tmp_path).records(), MINI)


def test_unknown_or_empty_table_requests_fail_clearly(suite, tmp_path):
    with pytest.raises(ResultsError, match="unknown table 'table3'"):
        build_tables(LocalRuns(suite).records(), MINI, ["table3"])
    write_block(tmp_path / "only5", "table5", "joint")
    with pytest.raises(ResultsError, match="table1: no finished mini runs are labelled table=table1"):
        build_tables(LocalRuns(tmp_path / "only5").records(), MINI, ["table1"])
    (tmp_path / "empty").mkdir()
    assert main(["--scale", "mini", "--runs", str(tmp_path / "empty")]) == 1  # no runs: an error, not empty tables


def test_slim_copy_keeps_what_tables_read_and_refuses_unfinished_runs(tmp_path):
    run = write_run(tmp_path / "runs", table="table5", protocol="joint", row="tmpo", seed=0, method="tmpo")
    dst = copy_run(run, tmp_path / "committed" / "table5_joint" / "tmpo" / "seed0")
    rows = [json.loads(x) for x in (dst / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 0, **{f"base/{k}": v for k, v in BASE.items()}}
    assert all(set(r) == {"step", "iter_time_s", "train/reward_mean"} for r in rows[1:]) and len(rows) == STEPS + 1
    assert (dst / "summary.json").read_text() == (run / "summary.json").read_text()
    original, copied = LocalRuns(tmp_path / "runs").read(run), LocalRuns(tmp_path / "committed").read(dst)
    assert copied.finished and copied.labels == original.labels
    pd.testing.assert_frame_equal(copied.history, original.history)
    unfinished = write_run(tmp_path / "runs", table="table5", protocol="joint", row="tmpo", seed=1, method="tmpo",
                           finished=False)
    with pytest.raises(ValueError, match="not finished"):
        copy_run(unfinished, tmp_path / "committed" / "x")
    assert slim_metrics(['{"step": 3, "train/loss": 1.0}']) == []  # nothing the tables read


def test_labels_from_a_config_and_their_wandb_identity():
    config = {"method": "gardo", "ablation": "full", "model": {"_target_": "M"}, "trainer": {"seed": 2},
              "tags": {"scale": "mini", "table": "table1", "protocol": "ocr", "row": "gardo",
                       "experiment": "mini/table1_ocr"}}
    labels = run_labels(config, git={"git_commit": "abc", "git_dirty": True})
    assert labels == {"method": "gardo", "ablation": "full", "model": "M", "seed": 2, "scale": "mini", "table": "table1",
                      "protocol": "ocr", "row": "gardo", "experiment": "mini/table1_ocr", "git_commit": "abc",
                      "git_dirty": True}
    ident = wandb_identity(labels)
    assert ident["group"] == "mini/table1_ocr/gardo" and ident["name"] == "mini/table1_ocr/gardo/seed2"
    assert ident["tags"] == ["mini", "table1", "ocr", "gardo", "seed2", "experiment=mini/table1_ocr"]
    assert wandb_identity(run_labels({"method": "tmpo"}, git={})) == {}  # a run outside an experiment
    assert run_labels({"method": "tmpo"})["git_commit"] not in ("", None)  # this checkout's HEAD


def test_paper_numbers_are_the_reference_csv():
    paper = read_paper_numbers()
    assert len(paper) == 217
    assert paper[("table1", "geneval", "tmpo", "geneval")] == 0.949
    assert paper[("table6", "pickscore", "base", "cosdiv")] == 0.213


def test_a_metric_missing_from_some_seeds_is_an_error_not_a_smaller_mean(tmp_path):
    write_block(tmp_path, "table5", "joint")
    run = tmp_path / "table5_joint" / "tmpo" / "seed2"
    summary = json.loads((run / "summary.json").read_text())
    del summary["lgmd"]
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ResultsError, match=r"table5/joint/tmpo: lgmd: 1 of 3 runs lack this metric"):
        build_tables(LocalRuns(tmp_path).records(), MINI)
