"""The GenEval reward-server client against a local server speaking the real protocol (loopback only):
healthy, slow, dead, 500, truncated, garbage, wrong-length and non-builtin replies."""

from __future__ import annotations

import io
import pickle
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch


from tmpo.rewards.geneval_client import (
    GenEvalServerClient, GenEvalServerError, GenEvalServerMetric, GenEvalServerReward, per_tag_accuracy, split_chunks,
)

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
META = [
    {"tag": "single_object", "prompt": "a photo of a cat", "include": [{"class": "cat", "count": 1}]},
    {"tag": "counting", "prompt": "a photo of two dogs", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}]},
    {"tag": "colors", "prompt": "a photo of a red car", "include": [{"class": "car", "count": 1, "color": "red"}]},
]


class _Server:
    """A reward server stand-in: decodes the real request and answers per ``mode``.

    Scores are a function of the image's mean brightness (bright = correct), so the test knows them.
    """

    def __init__(self, mode: str = "ok", delay: float = 0.0) -> None:
        self.mode, self.delay, self.requests = mode, delay, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append(body)
                if outer.delay:
                    time.sleep(outer.delay)
                status, payload, length = outer.answer(body)
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(length if length is not None else len(payload)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def answer(self, body: bytes):
        from PIL import Image

        req = pickle.loads(body)
        if self.mode == "500":
            return 500, b"Traceback (most recent call last):\n  ...\nKeyError: 'tag'\n", None
        if self.mode == "503":
            return 503, b"busy", None
        if self.mode == "garbage":
            return 200, b"<html>not a pickle</html>", None
        bright = [float(torch.tensor(list(Image.open(io.BytesIO(d), formats=["jpeg"]).getdata())).float().mean()) > 127 for d in req["images"]]
        n = min(len(req["images"]), len(req["meta_datas"]))
        strict = [1.0 if b else 0.0 for b in bright[:n]]
        official = [0.0] * n if req["only_strict"] else list(strict)
        group = lambda vals: {t: [v if m["tag"] == t else -10.0 for v, m in zip(vals, req["meta_datas"])] for t in TAGS}  # noqa: E731
        reply = {"scores": [1.0 if b else 0.25 for b in bright[:n]], "rewards": official, "strict_rewards": strict,
                 "group_rewards": group(official), "group_strict_rewards": group(strict)}
        if self.mode == "short":
            reply = {k: (v[:-1] if isinstance(v, list) else v) for k, v in reply.items()}
        if self.mode == "evil":
            return 200, pickle.dumps(torch.zeros(2)), None  # a global (torch) inside the reply
        payload = pickle.dumps(reply)
        if self.mode == "truncated":
            return 200, payload[: len(payload) // 2], len(payload)  # promises more than it sends, then closes
        return 200, payload, None

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _images(bright: list[bool]) -> torch.Tensor:
    return torch.stack([torch.full((3, 16, 16), 0.9 if b else 0.1) for b in bright])


def test_healthy_server_round_trip_and_wire_format():
    with _Server() as srv:
        reward = GenEvalServerReward(srv.url, mode="partial", retries=0)
        scores, info = reward(_images([True, False, True]), [m["prompt"] for m in META], [{**m, "group": 0} for m in META])
        req = pickle.loads(srv.requests[0])
    assert scores.tolist() == [1.0, 0.25, 1.0]  # training reward = partial-credit `scores`
    assert info["strict_correct"].tolist() == [1.0, 0.0, 1.0]
    assert info["strict_per_tag"] == {"single_object": 1.0, "counting": 0.0, "colors": 1.0}
    assert set(req) == {"images", "meta_datas", "only_strict"} and req["only_strict"] is True
    assert req["images"][0][:2] == b"\xff\xd8"  # JPEG files
    assert "group" not in req["meta_datas"][0] and req["meta_datas"][1]["exclude"] == [{"class": "dog", "count": 3}]


def test_eval_metric_reports_official_and_strict_accuracy_per_tag_without_sentinels():
    meta = META + [{**META[0], "prompt": "a photo of a cow"}]
    with _Server() as srv:
        out = GenEvalServerMetric(srv.url, retries=0)(_images([True, False, True, False]), None, [m["prompt"] for m in meta], meta, 2)
        assert pickle.loads(srv.requests[0])["only_strict"] is False
    # single_object: 1 of 2, counting 0 of 1, colors 1 of 1 -> overall (0.5 + 0 + 1) / 3
    assert out["geneval_official/single_object"] == 0.5 and out["geneval_official/counting"] == 0.0
    assert out["geneval_official"] == pytest.approx(0.5) and out["geneval_strict"] == pytest.approx(0.5)
    assert out["geneval_partial"] == pytest.approx((1 + 0.25 + 1 + 0.25) / 4)


def test_batches_go_in_near_equal_chunks_of_at_most_64():
    assert [len(c) for c in split_chunks(130)] == [44, 43, 43]
    assert [len(c) for c in split_chunks(64)] == [64]
    meta = [META[0]] * 70
    with _Server() as srv:
        scores, _ = GenEvalServerReward(srv.url, retries=0)(_images([True] * 70), ["p"] * 70, meta)
        sizes = [len(pickle.loads(b)["images"]) for b in srv.requests]
    assert sizes == [35, 35] and scores.shape == (70,)


def test_a_500_is_raised_at_once_with_the_traceback_not_retried():
    with _Server("500") as srv:
        client = GenEvalServerClient(srv.url, retries=5, backoff=10.0)
        t0 = time.perf_counter()
        with pytest.raises(GenEvalServerError, match=r"HTTP 500.*not retried.*KeyError: 'tag'"):
            client.score(_images([True]), META[:1], only_strict=True)
        assert time.perf_counter() - t0 < 5 and len(srv.requests) == 1


def test_dead_server_is_retried_a_bounded_number_of_times_then_named():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    client = GenEvalServerClient(f"http://127.0.0.1:{port}", retries=2, backoff=0.01, timeout=2)
    with pytest.raises(GenEvalServerError, match=rf"127.0.0.1:{port} unreachable after 3 tries: connection failed"):
        client.score(_images([True]), META[:1], only_strict=True)


def test_slow_server_times_out_and_transient_status_is_retried():
    with _Server(delay=1.0) as srv:
        with pytest.raises(GenEvalServerError, match=r"unreachable after 2 tries: no reply within 0.2 s"):
            GenEvalServerClient(srv.url, retries=1, backoff=0.01, timeout=0.2).score(_images([True]), META[:1], True)
    with _Server("503") as srv:
        with pytest.raises(GenEvalServerError, match="after 3 tries: HTTP 503"):
            GenEvalServerClient(srv.url, retries=2, backoff=0.01).score(_images([True]), META[:1], True)
        assert len(srv.requests) == 3


@pytest.mark.parametrize("mode, message", [
    ("garbage", "not a pickled dict"),
    ("evil", "only built-in types"),
    ("short", r"sent 3 images but the reply has lengths"),
    ("truncated", "reply cut off|not a pickled dict"),
])
def test_bad_replies_are_errors_never_silent_zeros(mode, message):
    with _Server(mode) as srv:
        with pytest.raises(GenEvalServerError, match=message):
            GenEvalServerClient(srv.url, retries=1, backoff=0.01, timeout=5).score(_images([True, False, True]), META, True)


def test_non_loopback_urls_and_bad_metadata_are_refused_before_sending():
    with pytest.raises(ValueError, match="not a loopback address"):
        GenEvalServerClient("http://10.0.0.5:18085")
    assert GenEvalServerClient("http://localhost:18085").url.endswith("18085")
    client = GenEvalServerClient("http://[::1]:1", retries=0)
    with pytest.raises(ValueError, match="'tag' must be one of"):
        client.score(_images([True]), [{"prompt": "x", "include": [{"class": "cat", "count": 1}]}], True)
    import numpy as np

    with pytest.raises(ValueError, match="not JSON-serialisable"):
        client.score(_images([True]), [{**META[0], "extra": np.float32(1.0)}], True)


def test_per_tag_accuracy_drops_sentinels():
    assert per_tag_accuracy({"colors": [-10.0, 1.0, 0.0], "position": [-10.0, -10.0, -10.0]}) == {"colors": 0.5}
