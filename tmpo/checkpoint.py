"""Atomic checkpoints: write to a temporary file in the same directory, fsync, then rename."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

LATEST = "latest.pt"


def save_atomic(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Save ``state`` so that ``path`` is either the old or the new complete file, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON through a unique temporary file and a rename (race- and crash-safe)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic`, with a clear error if it is missing or corrupt."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / LATEST if (path / "checkpoints").is_dir() else path / LATEST
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}; pass resume=<run dir or .pt file> of an earlier run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a torn or foreign file
        raise ValueError(f"checkpoint {path} cannot be read ({e}); it is corrupt or not a tmpo checkpoint") from e
    if not isinstance(state, dict) or "step" not in state or "policy" not in state:
        raise ValueError(f"{path} is not a tmpo checkpoint (missing 'step'/'policy')")
    return state
