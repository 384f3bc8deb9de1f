"""Write (``python -m tmpo.world.make_prompts``) and read (:func:`load_prompts`) the prompt splits.

Files: ``tmpo/world/prompts/{geneval,ocr,preference}_{train,test}.jsonl``, one JSON record per line,
each with at least ``tag`` and ``prompt`` (GenEval records add ``include``/``exclude``, OCR records
``text``, preference records ``objects``/``background``). Test prompts never occur in train.

* ``geneval``: all six tags. Each tag's distinct prompts (a small world has few: 5 single_object,
  10 counting, 400 color_attr) are shuffled and split 80/20, with at least one test prompt per tag,
  and at most ``96`` train / ``24`` test prompts per tag so that color_attr does not swamp the set.
* ``ocr``: distinct random 3-character strings, 200 train / 50 test.
* ``preference``: distinct scene descriptions, 200 train / 50 test.

The output is a pure function of ``--seed``; ``--check`` verifies the committed files match it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tmpo.world.captions import GENEVAL_TAGS, enumerate_geneval, ocr, random_preference, random_text

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
PROTOCOLS: tuple[str, ...] = ("geneval", "ocr", "preference")
SPLITS: tuple[str, ...] = ("train", "test")
DEFAULT_SEED = 0
_REGENERATE = "regenerate it with `python -m tmpo.world.make_prompts`"


def split_geneval(
    rng: np.random.Generator, test_fraction: float = 0.2, max_train: int = 96, max_test: int = 24
) -> dict[str, list[dict[str, Any]]]:
    """Per-tag disjoint train/test GenEval records, shuffled across tags."""
    train: list[dict[str, Any]] = []
    test: list[dict[str, Any]] = []
    for tag in GENEVAL_TAGS:
        records = enumerate_geneval(tag)
        order = rng.permutation(len(records))
        n_test = min(max_test, max(1, round(test_fraction * len(records))))
        test += [records[i] for i in order[:n_test]]
        train += [records[i] for i in order[n_test:][:max_train]]
    return {"train": _shuffled(train, rng), "test": _shuffled(test, rng)}


def split_unique(
    make: Callable[[np.random.Generator], dict[str, Any]], rng: np.random.Generator, n_train: int, n_test: int
) -> dict[str, list[dict[str, Any]]]:
    """Draw ``n_train + n_test`` records with distinct prompts from ``make`` and split them."""
    seen: dict[str, dict[str, Any]] = {}
    while len(seen) < n_train + n_test:
        record = make(rng)
        seen.setdefault(record["prompt"], record)
    records = list(seen.values())
    return {"train": records[:n_train], "test": records[n_train:]}


def _shuffled(records: list[dict[str, Any]], rng: np.random.Generator) -> list[dict[str, Any]]:
    return [records[i] for i in rng.permutation(len(records))]


def build_all(seed: int = DEFAULT_SEED) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """All splits as {(protocol, split): records}. Each protocol has its own seeded stream."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    builders = {
        "geneval": lambda rng: split_geneval(rng),
        "ocr": lambda rng: split_unique(lambda r: ocr(random_text(r)), rng, 200, 50),
        "preference": lambda rng: split_unique(random_preference, rng, 200, 50),
    }
    for k, protocol in enumerate(PROTOCOLS):
        splits = builders[protocol](np.random.default_rng([seed, k]))
        for split in SPLITS:
            out[protocol, split] = splits[split]
    return out


def _to_jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def prompt_path(protocol: str, split: str, root: Path | None = None) -> Path:
    """Path of one split file; ValueError for an unknown protocol or split."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown prompt protocol {protocol!r}; known: {PROTOCOLS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    return (PROMPT_DIR if root is None else Path(root)) / f"{protocol}_{split}.jsonl"


def _check_record(record: Any, protocol: str) -> str | None:
    """Why a parsed line is not a valid record of ``protocol`` (None if it is)."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if not isinstance(record.get("prompt"), str) or not record["prompt"]:
        return "missing or empty 'prompt'"
    tag = record.get("tag")
    if protocol == "geneval":
        if tag not in GENEVAL_TAGS:
            return f"'tag' must be one of {GENEVAL_TAGS}, got {tag!r}"
        if not isinstance(record.get("include"), list) or not record["include"]:
            return "a GenEval record needs a non-empty 'include' list"
    elif protocol == "ocr":
        if tag != "ocr" or not isinstance(record.get("text"), str) or not record["text"]:
            return "an OCR record needs tag 'ocr' and a non-empty 'text'"
    elif protocol == "preference":
        if tag != "preference" or not isinstance(record.get("objects"), list) or "background" not in record:
            return "a preference record needs tag 'preference', an 'objects' list and a 'background'"
    return None


def load_prompts(protocol: str, split: str, root: Path | None = None) -> list[dict[str, Any]]:
    """Records of ``{protocol}_{split}.jsonl`` (from ``tmpo/world/prompts`` unless ``root`` is given).

    Raises:
        FileNotFoundError: the file is missing (the message says how to regenerate it).
        ValueError: a line is not valid JSON or not a valid record (the message gives file:line).
    """
    path = prompt_path(protocol, split, root)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} is missing; {_REGENERATE}")
    records = []
    with path.open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg}); {_REGENERATE}") from None
            problem = _check_record(record, protocol)
            if problem is not None:
                raise ValueError(f"{path}:{lineno}: {problem}; {_REGENERATE}")
            records.append(record)
    if not records:
        raise ValueError(f"prompt file {path} holds no records; {_REGENERATE}")
    return records


def main(argv: list[str] | None = None) -> int:
    """CLI: write the splits (default) or, with ``--check``, verify the files on disk match."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=PROMPT_DIR, help="where to write the .jsonl files")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--check", action="store_true", help="only verify that the files are up to date")
    args = parser.parse_args(argv)
    stale = []
    for (protocol, split), records in build_all(args.seed).items():
        path = prompt_path(protocol, split, args.out_dir)
        text = _to_jsonl(records)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {len(records):4d} prompts to {path}")
    if stale:
        print("out of date (" + _REGENERATE + "):\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
