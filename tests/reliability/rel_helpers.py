"""Shared pieces of the reliability tests: real `python -m tmpo.run` processes on the toy, and readers
for what a run leaves on disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
# The toy at its smallest: one prompt group of 27 leaves per iteration (milliseconds), a small eval.
TOY = ["model=toy", "reward=gmm_modes", "logger=none", "trainer.progress=false", "trainer.prompts_per_step=1",
       "eval.samples_per_prompt=50", "trainer.ema_every=2"]
TIMING = ("iter_time_s",)


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline",
            "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}


def cli(args: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``python -m tmpo.run <args>`` to completion."""
    return subprocess.run([sys.executable, "-m", "tmpo.run", *args], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """Start ``python -m tmpo.run <args>`` in the background, stdout and stderr into ``log``."""
    out = log.open("w")
    return subprocess.Popen([sys.executable, "-m", "tmpo.run", *args], cwd=cwd, env=env(), stdout=out,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_rows(metrics: Path, n: int, proc: subprocess.Popen | None = None, timeout: float = 120) -> int:
    """Block until ``metrics`` has ``n`` complete rows (or the process ended); return the count."""
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        if metrics.exists():
            count = metrics.read_text().count("\n")
            if count >= n:
                return count
        if proc is not None and proc.poll() is not None:
            return count
        time.sleep(0.02)
    raise TimeoutError(f"{metrics} reached {count} rows, not {n}, in {timeout} s")


def send_and_wait(proc: subprocess.Popen, signum: int, timeout: float = 120) -> int:
    proc.send_signal(signum)
    return proc.wait(timeout=timeout)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_rows(run_dir: Path) -> list[dict]:
    """Logged training rows without wall-clock timings."""
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k not in TIMING}
            for r in rows(run_dir) if "train/loss" in r]


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)


def assert_same(a, b, where: str = "state") -> None:
    """Bit-for-bit equality of nested dicts / lists / tensors / numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


TRAINING_STATE = ("step", "policy", "policy_reference", "ema", "optimizer", "scheduler", "objective")


def assert_same_training_state(a: dict, b: dict) -> None:
    for key in TRAINING_STATE:
        assert_same(a.get(key), b.get(key), key)


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes (to prove nothing was written)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGUSR1": signal.SIGUSR1, "SIGUSR2": signal.SIGUSR2, "SIGINT": signal.SIGINT}


def killed_in_process(run_dir: Path, overrides: list[str], at: int) -> Path:
    """An in-process run that died while computing iteration ``at + 1`` (after the checkpoints its
    ``trainer.checkpoint_every`` wrote up to step ``at``)."""
    import pytest

    from conftest import compose_run
    from tmpo.run import build_trainer

    trainer = build_trainer(compose_run(overrides, run_dir))
    original = trainer.train_step

    def killed(step):
        if step == at:
            raise KeyboardInterrupt("killed")
        return original(step)

    trainer.train_step = killed
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    return run_dir
