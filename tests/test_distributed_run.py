"""Two processes through the real entry points on the tiny FLUX (CPU, gloo): ``accelerate launch
--num_processes 2 -m tmpo.run`` and the SLURM launcher's one-task-per-GPU path (submitit's local
executor, 2 tasks), against one ``python -m tmpo.run`` with the same global batch and
``trainer.noise_seeding=group``.

TMPO, 4 prompt groups x 27 leaves, 2 iterations of 2 whole-group optimizer steps (so the second step's
ratios, clip and RatioNorm are exercised): process r holds groups r and r + 2, and its i-th minibatch
together with the other's is the one-process run's i-th minibatch.

Tolerance. The runs draw the same noise and sum the same numbers in another order: each process's
transformer runs on half the batch (float32 GEMMs whose blocking depends on the batch size), DDP averages
two half-batch gradients instead of summing one batch, and statistics are means of per-process means.
Each costs a few float32 ulps (relative 1e-7); measured: LoRA weights within 1.5e-8 (entries up to ~1),
rewards and losses within ~1e-7 relative. We allow 1e-6 on weights (1/30 of one Adam step of lr 3e-5)
and 1e-4 relative on logged numbers (1e-7 absolute for the near-zero ones: the second step's log-ratios,
~3e-6, are differences of float32 log-probs and differ by ~1.5e-8); ``train/grad_norm`` is compared too, because Adam's update does not
see a gradient's scale (a sum over processes instead of a mean would leave the weights equal).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RUN = ["model=flux_tiny", "method=tmpo", "reward=pickscore", "trainer.prompts_per_step=4", "trainer.minibatches=2",
       "eval.max_prompts=2", "reward.suites.drawbench.max_prompts=3", "trainer.eval_base=false", "logger=none",
       "trainer.progress=false"]
WEIGHT_ATOL, REL, ABS = 1e-6, 1e-4, 1e-7
COMPARED = ("train/reward_mean", "train/reward_std", "train/adv_std", "train/loss", "train/grad_norm", "train/ratio_mean",
            "train/kl_ref", "train/log_ratio_absmax", "train/optimizer_steps", "train/edges_per_prompt",
            "nfe/grad_per_prompt", "nfe/nograd_per_prompt", "diag/corr_logp_reward", "diag/logp_spread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}


def _run(cmd: list[str], timeout: int = 600) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=_env())
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def one_process(run_dir: Path, *extra: str) -> Path:
    _run([sys.executable, "-m", "tmpo.run", *RUN, "trainer.noise_seeding=group", *extra, f"hydra.run.dir={run_dir}"])
    return run_dir


def two_processes(run_dir: Path, *extra: str) -> Path:
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "conf/accelerate/ddp.yaml"),
          "--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "tmpo.run", *RUN, *extra,
          f"hydra.run.dir={run_dir}"])
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("distributed")
    return {"one": one_process(base / "one"), "two": two_processes(base / "two")}


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)


def assert_same_training(got: Path, want: Path) -> None:
    """Same weights (policy and EMA) and the same logged training and evaluation numbers."""
    a, b = state(got), state(want)
    assert a["step"] == b["step"] == 2 and a["policy"].keys() == b["policy"].keys()
    for part in ("policy", "ema"):
        for name, value in b[part].items():
            torch.testing.assert_close(a[part][name], value, rtol=0, atol=WEIGHT_ATOL, msg=f"{part} {name}")
    train_a = {r["step"]: r for r in rows(got) if "train/loss" in r}
    train_b = {r["step"]: r for r in rows(want) if "train/loss" in r}
    assert sorted(train_a) == sorted(train_b) == [1, 2]
    for step, row in train_b.items():
        for key in COMPARED:
            assert math.isclose(train_a[step][key], row[key], rel_tol=REL, abs_tol=ABS), (step, key, train_a[step][key], row[key])
    assert train_b[2]["train/optimizer_steps"] == 2.0 and train_b[2]["train/group_size"] == 27.0
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (got, want))
    for key in ("reward", "pickscore", "hpsv21", "imagereward", "lgmd", "cosdiv"):
        assert math.isclose(sa[key], sb[key], rel_tol=REL), (key, sa[key], sb[key])


def test_two_processes_train_what_one_process_trains(runs):
    assert_same_training(runs["two"], runs["one"])
    # not vacuous: LoRA's B starts at zero and moved ~9e-5 in 4 Adam steps of lr 3e-5, ~90x the tolerance
    moved = max(float(v.abs().max()) for n, v in state(runs["one"])["policy"].items() if "lora_B" in n)
    assert moved > 50 * WEIGHT_ATOL


def test_only_rank_zero_writes(runs):
    two = runs["two"]
    assert len(rows(two)) == len(rows(runs["one"])) == 3  # 2 training rows + the final eval, once
    assert (two / "run.rank1.log").exists() and (two / ".hydra").is_dir()
    log0 = (two / "run.log").read_text()  # Hydra opens run.log in both processes; rank 1 moves to its own file
    assert log0.count("[tmpo.run][INFO] - start:") == 1 and log0.count("eval after iteration 2") == 1
    log1 = (two / "run.rank1.log").read_text()
    assert "eval after iteration 2" in log1 and "[INFO] - samples:" not in log1  # rank 1 evaluated; rank 0 alone wrote samples.png
    assert "[INFO] - samples:" in log0
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["latest.pt"]


def test_a_two_process_run_resumes_where_it_stopped(runs, tmp_path):
    """1 iteration, then ``resume=auto trainer.total_steps=2`` in the same dir: both processes load the
    checkpoint and continue as the straight 2-iteration run (a process that did not load it would send
    different gradients into the average)."""
    run_dir = two_processes(tmp_path / "resumed", "trainer.total_steps=1")
    two_processes(run_dir, "trainer.total_steps=2", "resume=auto")
    assert_same_training(run_dir, runs["two"])
    assert len((run_dir / "resumes.jsonl").read_text().splitlines()) == 1


def test_the_slurm_launcher_runs_one_process_per_task(runs, tmp_path):
    """hydra/launcher=slurm starts one task per GPU; submitit's local executor runs the same code path
    with 2 tasks here (tmpo.distributed.from_environment turns the tasks into torch.distributed ranks)."""
    sweep = tmp_path / "sweep"
    _run([sys.executable, "-m", "tmpo.run", "-m", "hydra/launcher=local", "hydra.launcher.tasks_per_node=2", *RUN,
          f"hydra.sweep.dir={sweep}"])
    (job,) = [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert_same_training(job, runs["one"])
    assert (job / "run.rank1.log").exists()


def _launcher(*overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tmpo.config import config_dir, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True).hydra.launcher


def test_the_slurm_config_starts_one_task_per_gpu():
    launcher = _launcher("hydra/launcher=slurm")
    assert launcher.gpus_per_node == 8 and launcher.tasks_per_node == 8 and launcher.nodes == 1
    assert _launcher("hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4").tasks_per_node == 4


def _pids_with(tag: str, rank: str) -> list[int]:
    """Processes whose environment holds ``TMPO_TEST_TAG=<tag>`` and ``RANK=<rank>`` (a launched worker)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"TMPO_TEST_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env:
            found.append(int(proc.name))
    return found


def test_a_stop_signal_on_one_process_stops_both_after_the_same_iteration(tmp_path):
    """SIGUSR1 to rank 1 only: both processes stop after the same iteration (rank 0 never saw the
    signal), rank 0 checkpoints it, and ``resume=auto`` finishes the run from there."""
    import time
    import uuid

    run_dir, tag = tmp_path / "stopped", uuid.uuid4().hex
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "conf/accelerate/ddp.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "tmpo.run", *RUN,
           "trainer.total_steps=30", "trainer.checkpoint_every=0", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**_env(), "TMPO_TEST_TAG": tag}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    (rank1,) = _pids_with(tag, "1")
    os.kill(rank1, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-3000:]  # the processes exit for a requeue (144), accelerate reports it
    step = state(run_dir)["step"]
    train_rows = [r for r in rows(run_dir) if "train/loss" in r]
    assert 1 <= step < 30 and [r["step"] for r in train_rows] == list(range(1, step + 1)), out[-3000:]
    assert "received SIGUSR1" in (run_dir / "run.rank1.log").read_text()
    assert "received SIGUSR1" not in (run_dir / "run.log").read_text()  # rank 0 stopped on the agreement alone
    two_processes(run_dir, "trainer.total_steps=30", "trainer.checkpoint_every=0", "resume=auto")
    assert state(run_dir)["step"] == 30 and [r["step"] for r in rows(run_dir) if "train/loss" in r] == list(range(1, 31))


def test_an_error_on_one_process_stops_both_at_once_with_the_last_good_state(tmp_path):
    """Rank 1's reward raises at its second call (iteration 2): both processes stop at iteration 2 within
    seconds (rank 0 is not left waiting in a collective), rank 0 checkpoints the state iteration 2 started
    from (after iteration 1), and each process's error says what happened where."""
    run_dir = tmp_path / "failed"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "conf/accelerate/ddp.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "tmpo.run", *RUN,
           "trainer.total_steps=3", "trainer.checkpoint_every=0", "reward.fn._target_=distributed_checks.FailingReward",
           "+reward.fn.fail_rank=1", "+reward.fn.fail_call=2", f"hydra.run.dir={run_dir}"]
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "this process (rank 1) failed: ConnectionError: reward server" in out, out[-5000:]
    assert "iteration 2: process(es) [1] of 2 failed while rolling out or scoring" in out, out[-5000:]
    assert "the last good state (after iteration 1" in out, out[-5000:]
    assert state(run_dir)["step"] == 1 and [r["step"] for r in rows(run_dir) if "train/loss" in r] == [1]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["flow_grpo", "mixgrpo", "treegrpo", "gardo"])
def test_every_baseline_runs_in_two_processes(tmp_path, method):
    """The baselines' splits (leaves, group_leaves, whole groups) and GARDO's gathered gate in 2 processes."""
    run_dir = two_processes(tmp_path / method, f"method={method}")
    train_rows = [r for r in rows(run_dir) if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2] and all(math.isfinite(r["train/loss"]) for r in train_rows)
    assert train_rows[-1]["train/optimizer_steps"] == 2.0  # RUN's trainer.minibatches=2
