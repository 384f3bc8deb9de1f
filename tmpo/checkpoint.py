"""Atomic checkpoints: write to a temporary file in the same directory, fsync, then rename.

Every file the project writes with :func:`save_atomic` holds only tensors and plain Python containers,
so it loads with ``torch.load(weights_only=True)``: a crafted pickle is refused before any of its code
can run (:func:`safe_torch_load`).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

LATEST = "latest.pt"
CHECKPOINT_DIR = "checkpoints"
_log = logging.getLogger(__name__)


def _create_temporary(path: Path) -> tuple[int, str]:
    """A new, unique ``<name>.<random>.tmp`` beside ``path``, opened for writing.

    Unlike ``tempfile.mkstemp`` (always mode 0600) the file is created with mode 0666 minus the umask,
    like any file ``open()`` creates, so checkpoints and results stay readable by the user's group.
    """
    while True:
        tmp = path.parent / f"{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), str(tmp)
        except FileExistsError:
            continue


def _replace_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Replace ``path`` by what ``write(file)`` writes: a unique temporary file beside it, fsync, rename.

    ``path`` is always either the old or the new complete file, never a torn one; a failed write
    leaves no temporary behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_atomic(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Save ``state`` with ``torch.save`` so that ``path`` is either the old or the new complete file."""
    return _replace_atomically(path, lambda f: torch.save(state, f))


def write_json_atomic(obj: Any, path: str | os.PathLike, sort_keys: bool = False) -> Path:
    """Write ``obj`` as indented JSON through a unique temporary file and a rename (race- and crash-safe)."""
    return write_text_atomic(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n", path)


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) through a temporary file and a rename."""
    return write_bytes_atomic(text.encode("utf-8"), path)


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> Path:
    """Replace ``path`` with ``data`` (e.g. a PNG) through a temporary file and a rename."""
    return _replace_atomically(path, lambda f: f.write(data))


def clean_stray_temporaries(*dirs: str | os.PathLike) -> list[Path]:
    """Remove ``<name>.<random>.tmp`` files that a killed atomic write left in ``dirs``; return them.

    Only call this while no other process writes into these directories (a run owns its run dir).
    """
    removed = []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            continue
        for tmp in sorted(d.glob("*.*.tmp")):
            if tmp.is_file():
                tmp.unlink()
                removed.append(tmp)
    if removed:
        _log.warning("removed %d temporary file(s) left by interrupted writes: %s",
                     len(removed), ", ".join(str(p) for p in removed))
    return removed


def checkpoint_path(path: str | os.PathLike) -> Path:
    """A run directory (or a checkpoint directory) -> its ``latest.pt``; a file path is returned as is."""
    path = Path(path)
    if path.is_dir():
        return path / CHECKPOINT_DIR / LATEST if (path / CHECKPOINT_DIR).is_dir() else path / LATEST
    return path


def safe_torch_load(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` with one clear error for unreadable or unsafe files.

    A file holding anything but tensors and plain containers (a crafted pickle, an object from
    another program) is refused before any of its code runs.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        blocked = [ln for ln in lines if "GLOBAL" in ln]  # a class or function the file wants to import
        if blocked:
            raise ValueError(
                f"{what} {path} was refused: it holds objects that are not tensors or plain containers "
                f"({blocked[0]}), which torch.load(weights_only=True) will not unpickle. Files written by tmpo "
                "never do; do not load this file unless you trust its source"
            ) from e
        detail = next((ln for ln in lines if ln.startswith("Unsupported")), lines[-1] if lines else type(e).__name__)
        raise ValueError(f"{what} {path} cannot be read ({detail}); it is corrupt or not a tmpo {what}") from e
    except Exception as e:  # a torn or foreign file
        raise ValueError(f"{what} {path} cannot be read ({e}); it is corrupt or not a tmpo {what}") from e


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic`, with a clear error if it is missing, corrupt or unsafe."""
    path = checkpoint_path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}; pass resume=<run dir or .pt file> of an earlier run")
    state = safe_torch_load(path)
    if not isinstance(state, dict) or "step" not in state or "policy" not in state:
        raise ValueError(f"{path} is not a tmpo checkpoint (missing 'step'/'policy')")
    return state
