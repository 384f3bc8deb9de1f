"""Client of the GenEval reward server Flow-GRPO trains with (``shared/specs/geneval-server-protocol.md``).

Wire format, as the server expects it: ``POST <url>`` with a raw ``pickle.dumps`` body
``{"images": [JPEG bytes], "meta_datas": [GenEval records], "only_strict": bool}``; images are
``(x * 255).round().clamp(0, 255)`` uint8, JPEG at PIL's defaults; batches go as ``ceil(n / 64)``
near-equal chunks, one POST each, in order. A 200 reply is a pickled dict of built-in types with
``scores`` (partial credit, the training reward), ``rewards`` (official GenEval check; zeros when
``only_strict``), ``strict_rewards`` and per-tag lists in ``group_rewards`` / ``group_strict_rewards``
where ``-10.0`` marks "not this tag".

Where we differ from Flow-GRPO's client on purpose (its retry policy turns a deterministic 500 into a
33-hour hang, and it unpickles whatever comes back):

* Only transient faults are retried -- connection refused or dropped, a read time-out, a truncated
  body, 502/503/504 -- ``retries`` times with exponential backoff; then one error naming the server and
  the cause. A 500 is the server's traceback for *this* request (bad image, bad metadata): it is
  raised at once with the traceback's last lines. Other statuses (404, 405) are configuration errors.
* Replies are unpickled only from a loopback host (127.0.0.0/8, ::1, localhost) -- checked when the
  client is made -- and with an unpickler that refuses every global, so only plain dicts, lists,
  numbers and strings can come back.
* A reply whose lists are not exactly as long as the chunk sent is an error (the server silently
  zips to the shorter of images and metadata), never a truncation; so is a missing key.
* Metadata is checked before sending (GenEval rules + JSON-serialisable), so a bad record is our
  error message, not a server 500.
"""

from __future__ import annotations

import io
import ipaddress
import json
import math
import pickle
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from torch import Tensor

from tmpo.rewards.geneval import TAGS, validate_metadata

DEFAULT_URL = "http://127.0.0.1:18085"
CHUNK = 64
SENTINEL = -10.0
REPLY_KEYS = ("scores", "rewards", "strict_rewards", "group_rewards", "group_strict_rewards")
TRANSIENT_STATUS = (502, 503, 504)
MODES = ("partial", "strict", "official")


class GenEvalServerError(RuntimeError):
    """The reward server could not score a batch; the message names the server and the cause."""


class _BuiltinsOnly(pickle.Unpickler):
    """Unpickler that refuses every global: the protocol's replies are built-in containers only."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"reply references {module}.{name}; only built-in types are accepted")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def encode_jpeg(images: Tensor) -> list[bytes]:
    """``[N, 3, H, W]`` in [0, 1] -> JPEG files, quantised as Flow-GRPO does (PIL defaults, quality 75)."""
    from PIL import Image

    arrays = (images.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


def split_chunks(n: int, size: int = CHUNK) -> list[np.ndarray]:
    """``np.array_split(range(n), ceil(n / size))``: the client's near-equal chunks."""
    return [c for c in np.array_split(np.arange(n), max(1, math.ceil(n / size))) if c.size]


def per_tag_accuracy(group: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Mean per tag of a ``group_rewards`` dict after dropping the -10 sentinels; tags with no image are absent."""
    out = {}
    for tag, values in group.items():
        kept = [float(v) for v in values if float(v) != SENTINEL]
        if kept:
            out[tag] = sum(kept) / len(kept)
    return out


class GenEvalServerClient:
    """Talks to one reward server. See the module doc for the protocol and the error policy.

    Args:
        url: the server (``http://127.0.0.1:18085`` as Flow-GRPO runs it); must be a loopback address.
        timeout: seconds per request for connect and read (the server's workers die at 120 s).
        retries: extra tries for transient faults; ``backoff * 2**i`` seconds before try ``i + 1``.
        chunk_size: images per POST (64 as Flow-GRPO).
    """

    def __init__(self, url: str = DEFAULT_URL, timeout: float = 120.0, retries: int = 3, backoff: float = 2.0,
                 chunk_size: int = CHUNK) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"GenEval server url must be http://<host>:<port>, got {url!r}")
        if not is_loopback(parsed.hostname):
            raise ValueError(
                f"GenEval server url {url!r} is not a loopback address: its replies are pickles, which are only "
                "accepted from 127.0.0.1/::1/localhost (tunnel a remote server to a local port)"
            )
        if retries < 0 or timeout <= 0 or chunk_size < 1:
            raise ValueError(f"need retries >= 0, timeout > 0, chunk_size >= 1; got {retries}, {timeout}, {chunk_size}")
        self.url, self.timeout, self.retries, self.backoff, self.chunk_size = url, float(timeout), int(retries), float(backoff), int(chunk_size)

    def _post(self, body: bytes) -> bytes:
        import requests

        causes = []
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                resp = requests.post(self.url, data=body, timeout=self.timeout)
                content = resp.content
            except requests.exceptions.Timeout:
                causes.append(f"no reply within {self.timeout:g} s")
                continue
            except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
                causes.append(f"connection failed or reply cut off ({type(e).__name__})")
                continue
            if resp.status_code == 200:
                return content
            if resp.status_code in TRANSIENT_STATUS:
                causes.append(f"HTTP {resp.status_code}")
                continue
            text = content.decode("utf-8", "replace").strip().splitlines()
            detail = " | ".join(text[-3:]) if text else "(empty body)"
            what = "the server failed on this request (deterministic: not retried)" if resp.status_code == 500 else "unexpected status"
            raise GenEvalServerError(f"GenEval server {self.url}: HTTP {resp.status_code}, {what}: {detail}")
        raise GenEvalServerError(
            f"GenEval server {self.url} unreachable after {self.retries + 1} tries: {'; '.join(causes)}. "
            "Is it running (reward-server: gunicorn app_geneval:app)?"
        )

    def _decode(self, content: bytes, n: int) -> dict[str, Any]:
        try:
            reply = _BuiltinsOnly(io.BytesIO(content)).load()
        except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing here
            raise GenEvalServerError(
                f"GenEval server {self.url}: reply is not a pickled dict of built-in types ({type(e).__name__}: {e}); "
                f"first bytes {content[:40]!r}"
            ) from None
        if not isinstance(reply, dict) or any(k not in reply for k in REPLY_KEYS):
            got = sorted(reply) if isinstance(reply, dict) else type(reply).__name__
            raise GenEvalServerError(f"GenEval server {self.url}: reply lacks keys {REPLY_KEYS}; got {got}")
        lengths = {k: len(reply[k]) for k in REPLY_KEYS[:3]}
        lengths.update({f"group_rewards[{t}]": len(v) for t, v in reply["group_rewards"].items()})
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad:
            raise GenEvalServerError(f"GenEval server {self.url}: sent {n} images but the reply has lengths {bad}")
        return reply

    def score(self, images: Tensor, metadata: Sequence[Mapping[str, Any]], only_strict: bool) -> dict[str, Any]:
        """Score a batch -> the concatenated reply (``scores``, ``rewards``, ``strict_rewards``, group dicts)."""
        n = images.shape[0]
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
        if len(metadata) != n:
            raise ValueError(f"got {n} images and {len(metadata)} metadata records")
        records = []
        for m in metadata:
            validate_metadata(m)
            record = {k: v for k, v in m.items() if k != "group"}  # the loop's group tag is ours, not GenEval's
            try:
                json.dumps(record)
            except TypeError as e:
                raise ValueError(f"GenEval metadata for {m.get('prompt')!r} is not JSON-serialisable ({e})") from None
            records.append(record)
        jpegs = encode_jpeg(images)
        out: dict[str, Any] = {"scores": [], "rewards": [], "strict_rewards": [],
                               "group_rewards": {t: [] for t in TAGS}, "group_strict_rewards": {t: [] for t in TAGS}}
        for idx in split_chunks(n, self.chunk_size):
            body = pickle.dumps({"images": [jpegs[i] for i in idx], "meta_datas": [records[i] for i in idx], "only_strict": bool(only_strict)})
            reply = self._decode(self._post(body), len(idx))
            for k in ("scores", "rewards", "strict_rewards"):
                out[k] += [float(v) for v in reply[k]]
            for k in ("group_rewards", "group_strict_rewards"):
                for tag in TAGS:
                    out[k][tag] += [float(v) for v in reply[k].get(tag, [SENTINEL] * len(idx))]
        return out


class GenEvalServerReward:
    """The reward protocol over the server: ``reward(images, prompts, metadata) -> (Tensor[N], info)``.

    ``mode="partial"`` (default, Flow-GRPO's training reward) returns ``scores`` and asks with
    ``only_strict=True`` as Flow-GRPO's training does; ``"strict"`` returns ``strict_rewards``;
    ``"official"`` asks for the full check and returns ``rewards``. ``info`` carries all lists as
    float32 tensors (``score``, ``strict_correct``, ``correct``) and the per-tag accuracies.
    """

    def __init__(self, url: str = DEFAULT_URL, mode: str = "partial", timeout: float = 120.0, retries: int = 3,
                 backoff: float = 2.0, chunk_size: int = CHUNK) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown GenEval server reward mode {mode!r}; choose one of {MODES}")
        self.mode = mode
        self.client = GenEvalServerClient(url, timeout, retries, backoff, chunk_size)

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> tuple[Tensor, dict[str, Any]]:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images and {len(prompts)} prompts")
        reply = self.client.score(images, metadata, only_strict=self.mode != "official")
        info = {
            "score": torch.tensor(reply["scores"], dtype=torch.float32),
            "strict_correct": torch.tensor(reply["strict_rewards"], dtype=torch.float32),
            "correct": torch.tensor(reply["rewards"], dtype=torch.float32),
            "strict_per_tag": per_tag_accuracy(reply["group_strict_rewards"]),
            "tags": [m["tag"] for m in metadata],
        }
        if self.mode == "official":
            info["official_per_tag"] = per_tag_accuracy(reply["group_rewards"])
        key = {"partial": "score", "strict": "strict_correct", "official": "correct"}[self.mode]
        return info[key].clone(), info


class GenEvalServerMetric:
    """Evaluation on the GenEval test prompts: official and strict accuracy per tag and overall.

    Returns ``{name}_official`` and ``{name}_strict`` (mean of the per-tag accuracies, GenEval's overall
    score), ``{name}_partial`` (mean partial credit) and ``{name}_official/<tag>``, sentinels dropped.
    """

    def __init__(self, url: str = DEFAULT_URL, name: str = "geneval", timeout: float = 120.0, retries: int = 3,
                 backoff: float = 2.0, chunk_size: int = CHUNK) -> None:
        self.name = name
        self.client = GenEvalServerClient(url, timeout, retries, backoff, chunk_size)

    def __call__(self, samples: Tensor, latents: Tensor, prompts: list[str], metadata: list[dict], group_size: int) -> dict[str, float]:
        reply = self.client.score(samples, metadata, only_strict=False)
        official, strict = per_tag_accuracy(reply["group_rewards"]), per_tag_accuracy(reply["group_strict_rewards"])
        if not official:
            raise GenEvalServerError(f"GenEval server {self.client.url}: no image carried one of the tags {TAGS}")
        out = {f"{self.name}_official": sum(official.values()) / len(official),
               f"{self.name}_strict": sum(strict.values()) / len(strict),
               f"{self.name}_partial": float(np.mean(reply["scores"]))}
        out.update({f"{self.name}_official/{t}": v for t, v in official.items()})
        return out
