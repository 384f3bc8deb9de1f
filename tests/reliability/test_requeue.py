"""The submitit local launcher's requeue path, for real: a sweep job gets SIGTERM (as the scheduler would
send it), checkpoints, hands over to submitit, which re-submits it; the restarted job continues the same
run dir from its checkpoint (resume=auto is implied inside submitit) and the sweep ends successfully."""

import os
import signal

import pytest

from rel_helpers import TOY, rows, start, wait_for_rows

TOTAL = 400


@pytest.mark.slow  # two job starts under submitit (~30 s on 2 busy cores)
def test_submitit_local_job_is_requeued_after_sigterm_and_continues_its_run_dir(tmp_path):
    sweep = tmp_path / "sweep"
    launcher = start(["-m", "hydra/launcher=local", *TOY, f"trainer.total_steps={TOTAL}", "trainer.checkpoint_every=0",
                      f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=job"], cwd=tmp_path, log=tmp_path / "launcher.txt")
    run_dir = sweep / "job"
    wait_for_rows(run_dir / "metrics.jsonl", 6, launcher, timeout=180)
    controllers = [p for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]
    assert len(controllers) == 1, controllers  # submitit's local job id is its controller's pid
    os.kill(int(controllers[0].name), signal.SIGTERM)  # the controller forwards it to the job, like SLURM's
    assert launcher.wait(timeout=300) == 0, (tmp_path / "launcher.txt").read_text()

    job_log = "".join(p.read_text() for p in controllers[0].glob("*_log.*"))
    assert "stopped by SIGTERM after iteration" in job_log and "this job is preempted" in job_log
    resumes = (run_dir / "resumes.jsonl").read_text().splitlines()
    assert len(resumes) == 1  # restarted once, from its own checkpoint
    logged = rows(run_dir)
    assert [r["step"] for r in logged if "train/loss" in r] == list(range(1, TOTAL + 1))
    assert sum("eval/reward" in r for r in logged) == 1 and (run_dir / "summary.json").exists()
