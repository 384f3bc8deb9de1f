"""A non-editable install works from any directory: the wheel carries the Hydra configs (``tmpo/conf``,
built from the repository's ``conf/``) and the assets, and runs the toy from elsewhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "setup.py", "tmpo", "baselines", "conf")


def _run(args, cwd, env=None, timeout=240):
    out = subprocess.run(args, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


def test_the_wheel_ships_conf_and_runs_the_toy_from_another_directory(tmp_path):
    src = tmp_path / "src"  # build from a copy: setuptools writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
          str(src)], cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("tmpo-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    repo_yaml = {f"tmpo/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    assert repo_yaml and repo_yaml <= names  # every config, the sweep/launcher/help/logging ones included
    assert "tmpo/assets/mini/dit.pt" in names and "tmpo/assets/toy_flow.pt" in names

    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(target), "WANDB_SILENT": "true"}  # before the checkout's editable install on sys.path
    where = _run([sys.executable, "-c", "import tmpo.config as c; print(c.__file__); print(c.config_dir())"], elsewhere, env)
    module, conf = where.stdout.split()
    assert module.startswith(str(target)) and conf == str(target / "tmpo" / "conf")
    out = _run([sys.executable, "-m", "tmpo.run", "model=toy", "reward=gmm_modes", "trainer.total_steps=2",
                "eval.samples_per_prompt=50", "logger=none", "trainer.progress=false", "hydra.run.dir=run"], elsewhere, env)
    assert "tmpo on toy with the gmm_modes reward: 2 iterations" in out.stdout
    assert (elsewhere / "run" / "summary.json").exists() and (elsewhere / "run" / "samples.png").exists()
