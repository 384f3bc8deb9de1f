"""Real signals sent to real `python -m tmpo.run` processes: finish the iteration, checkpoint, exit with
the requeue code (SIGTERM/SIGUSR1/SIGUSR2) or the interrupt code (SIGINT); resume=auto then finishes
the run bit-exactly as if it had never stopped."""

import os
import signal

import pytest

from conftest import compose_run
from rel_helpers import (SIGNALS, TOY, assert_same, assert_same_training_state, checkpoint, rows, send_and_wait,
                         start, train_rows, wait_for_rows, cli)
from tmpo.run import build_trainer
from tmpo.signals import INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE, GracefulStop

TOTAL = 120
RUN = [*TOY, f"trainer.total_steps={TOTAL}", "trainer.checkpoint_every=0"]  # the only checkpoints: on stop, at the end


def _stopped_run(tmp_path, signame: str):
    """Start a run, signal it a few iterations in; return (exit code, its log, its run dir)."""
    run_dir = tmp_path / "run"
    proc = start([*RUN, f"hydra.run.dir={run_dir}"], cwd=tmp_path, log=tmp_path / "log.txt")
    wait_for_rows(run_dir / "metrics.jsonl", 6, proc)
    assert proc.poll() is None, "the run ended before the signal: raise TOTAL"
    code = send_and_wait(proc, SIGNALS[signame])
    return code, (tmp_path / "log.txt").read_text(), run_dir


def _assert_checkpoint_matches_the_log(run_dir):
    ck = checkpoint(run_dir)
    logged = [r["step"] for r in rows(run_dir) if "train/loss" in r]
    assert 0 < ck["step"] < TOTAL
    assert logged == list(range(1, ck["step"] + 1))  # the iteration in flight was finished and logged, no more
    assert ck["metrics_rows"] == len(rows(run_dir)) and not ck["finished"]
    assert not list(run_dir.rglob("*.tmp")) and not (run_dir / "summary.json").exists()
    return ck


def test_sigterm_checkpoints_its_iteration_and_resume_auto_finishes_bit_exactly(tmp_path):
    code, log, run_dir = _stopped_run(tmp_path, "SIGTERM")
    assert code == REQUEUE_EXIT_CODE, log
    assert "received SIGTERM" in log and "stopped by SIGTERM after iteration" in log and "Traceback" not in log
    stopped = _assert_checkpoint_matches_the_log(run_dir)

    again = cli([*RUN, f"hydra.run.dir={run_dir}", "resume=auto"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"resuming {run_dir} at step {stopped['step']}" in again.stdout + again.stderr
    assert [r["step"] for r in rows(run_dir) if "train/loss" in r] == list(range(1, TOTAL + 1))
    assert sum("eval/reward" in r for r in rows(run_dir)) == 1 and sum("base/reward" in r for r in rows(run_dir)) == 1

    in_process = [a for a in RUN if not a.startswith(("model=", "reward=", "logger=", "trainer.progress="))]
    build_trainer(compose_run(in_process, tmp_path / "straight")).run()  # the same config, never stopped
    assert_same_training_state(checkpoint(run_dir), checkpoint(tmp_path / "straight"))
    assert_same(train_rows(run_dir), train_rows(tmp_path / "straight"), "metrics.jsonl")


@pytest.mark.parametrize("signame", ["SIGUSR1", pytest.param("SIGUSR2", marks=pytest.mark.slow)])  # USR2: submitit's
def test_scheduler_warning_signals_checkpoint_and_exit_for_requeue(tmp_path, signame):
    code, log, run_dir = _stopped_run(tmp_path, signame)
    assert code == REQUEUE_EXIT_CODE, log
    assert f"stopped by {signame} after iteration" in log
    _assert_checkpoint_matches_the_log(run_dir)


def test_sigint_checkpoints_and_exits_130_without_a_traceback(tmp_path):
    code, log, run_dir = _stopped_run(tmp_path, "SIGINT")
    assert code == INTERRUPT_EXIT_CODE, log
    assert "Traceback" not in log and "continue it with resume=auto" in log
    _assert_checkpoint_matches_the_log(run_dir)


def test_graceful_stop_records_the_signal_a_second_sigint_interrupts_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        os.kill(os.getpid(), signal.SIGTERM)  # a preemption outranks a Ctrl-C: the job must be requeued
        assert stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(KeyboardInterrupt), GracefulStop():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
