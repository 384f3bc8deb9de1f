"""The suite launcher (experiments/run_suite.py): job commands, job states (fresh -> partial -> finished ->
recorded), cost arithmetic, the mini suite's budget, and (slow) a real two-job launch through
hydra/launcher=local that records its runs, skips them when run again, and feeds the tables."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from experiments.run_suite import (EVAL_S, MMDIT_FACTOR, Job, block_jobs, iteration_costs, job_cost, job_state, main,
                                  next_job)
from synthetic_runs import write_run
from tmpo.results.aggregate import Options, build_tables
from tmpo.results.runs import LocalRuns


def job(tmp_path, **kw) -> Job:
    args = dict(block="mini/table5_joint", row="tmpo", seed=1, first_seed=False, scale="mini", protocol="joint",
                model="mini", method="tmpo", ablation="full", total_steps=4, runs_root=tmp_path / "runs",
                records_root=tmp_path / "results")
    return Job(**{**args, **kw})


def test_a_job_is_one_multirun_through_the_local_launcher_into_a_fixed_dir(tmp_path):
    cmd = job(tmp_path).command(["x=1"])
    assert cmd[1:4] == ["-m", "tmpo.run", "-m"]
    for part in ("experiment=mini/table5_joint", "experiment/row=tmpo", "trainer.seed=1", "hydra/launcher=local",
                 f"hydra.sweep.dir={tmp_path / 'runs/mini/table5_joint'}", "hydra.sweep.subdir=tmpo/seed1",
                 "resume=auto", "trainer.eval_base=false"):
        assert part in cmd
    assert cmd[-1] == "x=1"
    assert "trainer.eval_base=false" not in job(tmp_path, seed=0, first_seed=True).command()  # evaluates the base


def test_job_states_from_fresh_to_recorded(tmp_path):
    j = job(tmp_path)
    assert job_state(j) == "fresh"
    (j.run_dir / "checkpoints").mkdir(parents=True)
    (j.run_dir / "checkpoints" / "latest.pt").write_bytes(b"x")
    assert job_state(j) == "partial"
    shutil.rmtree(j.run_dir)
    write_run(j.run_dir.parents[2], table="table5", protocol="joint", row="tmpo", seed=1,
              method="tmpo", experiment="table5_joint")
    assert job_state(j) == "finished"
    assert main(["collect", "mini/table5_joint", "--rows", "tmpo", "--seeds", "1", "--runs-root", str(tmp_path / "runs"),
                 "--records-root", str(tmp_path / "results")]) == 0
    assert job_state(j) == "recorded" and (j.record_dir / "summary.json").exists()


def test_job_cost_is_iterations_times_bench_plus_evaluations(tmp_path):
    costs = {"tmpo": 2.0, "no_tree": 5.0, "gardo": 8.0}
    assert job_cost(job(tmp_path), costs) == 4 * 2.0 + EVAL_S[("mini", "joint")]
    assert job_cost(job(tmp_path, first_seed=True), costs) == 4 * 2.0 + 2 * EVAL_S[("mini", "joint")]
    assert job_cost(job(tmp_path, ablation="no_tree"), costs) == 4 * 5.0 + EVAL_S[("mini", "joint")]
    mmdit = job(tmp_path, model="mini_mmdit", protocol="pickscore", method="gardo")
    assert job_cost(mmdit, costs) == pytest.approx(4 * 8.0 * MMDIT_FACTOR + EVAL_S[("mini_mmdit", "pickscore")])
    with pytest.raises(KeyError, match="no iteration time for 'flow_grpo'"):
        job_cost(job(tmp_path, method="flow_grpo"), costs)


def test_with_a_deadline_a_lane_takes_the_longest_job_that_still_ends_in_time(tmp_path):
    long, mid, short = (job(tmp_path, row=r) for r in ("long", "mid", "short"))
    seconds = {"long": 500.0, "mid": 300.0, "short": 100.0}
    estimate = (lambda j: seconds[j.row])
    queue = [long, mid, short]
    assert next_job(queue, estimate, deadline=1400.0, now=1000.0) is mid  # 1000 + 500 > 1400 >= 1000 + 300
    assert queue == [long, short]
    assert next_job(queue, estimate, deadline=1050.0, now=1000.0) is None and queue == [long, short]
    assert next_job(queue, estimate, deadline=None, now=1e9) is long  # no deadline: plain longest first
    assert next_job([], estimate, deadline=None, now=0.0) is None


def test_the_mini_suite_fits_twelve_hours_on_two_lanes():
    """The budget of conf/experiment/mini/_common.yaml, redone from the current configs and bench file: if a
    method got costlier (results/bench/summary.json), lower the blocks' iterations."""
    costs = iteration_costs()
    jobs = [j for b in ("table1_geneval", "table1_ocr", "table1_pickscore", "table2_ablation", "table5_joint",
                        "table6_sd35") for j in block_jobs(f"mini/{b}")]
    total = sum(job_cost(j, costs) for j in jobs)
    assert len(jobs) == 87 and total / 2 < 12 * 3600


@pytest.mark.slow
def test_a_real_launch_records_runs_skips_them_when_rerun_and_feeds_the_tables(tmp_path, capsys):
    tiny = ["model.random_init=true", "+model.model_config={width: 32, depth: 1, heads: 2, text_layers: 1}",
            "trainer.total_steps=2", "trainer.prompts_per_step=1", "eval.max_prompts=1", "eval.samples_per_prompt=3",
            "eval.num_steps=4", "reward.suites.drawbench.max_prompts=2", "logger=none"]
    args = ["mini/table5_joint", "--rows", "tmpo", "gardo", "--seeds", "0", "--lanes", "2",
            "--runs-root", str(tmp_path / "runs"), "--records-root", str(tmp_path / "results"), "--extra", *tiny]
    assert main(["run", *args]) == 0
    out = capsys.readouterr().out
    assert out.count("done   mini/table5_joint") == 2 and "2 of 2 jobs recorded" in out
    records = LocalRuns(tmp_path / "results" / "mini" / "records").records()
    done = sorted((r.labels["row"], r.labels["seed"], r.finished) for r in records)
    assert done == [("gardo", 0, True), ("tmpo", 0, True)]
    assert all(r.labels["git_commit"] not in ("", "unknown") for r in records)
    assert main(["run", *args]) == 0  # everything recorded: nothing is launched again
    assert "start" not in capsys.readouterr().out
    table = build_tables(records, Options("mini", partial=True))["table5"]
    assert set(table.row[table.n_seeds > 0]) == {"base", "tmpo", "gardo"}
    assert Path(tmp_path / "runs" / "mini" / "table5_joint" / "gardo" / "seed0" / "checkpoints" / "latest.pt").exists()
