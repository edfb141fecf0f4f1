"""The reward server's limits, each hit by a real client over loopback: request bytes, images per
request, pixels per image (a PNG bomb), wrong field types, stalled / trickling / idle clients
(which must not hold the scorer), the queue (busy -> the client waits), open connections."""
import http.client
import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from diffusion_opd.rewards.base import Scorer
from diffusion_opd.rewards.remote import RemoteError, RemoteScorer, ServerBusy, ServerUnavailable, encode_image
from diffusion_opd.rewards.serve import Limits, make_server


class Brightness(Scorer):
    """A weight-free scorer: mean pixel value in [0, 1]."""

    name = "brightness"

    def _load(self):
        pass

    def _score(self, images, prompts, metadata):
        return {self.name: np.array([np.asarray(im.convert("L"), np.float32).mean() / 255 for im in images],
                                    dtype=np.float32)}


@pytest.fixture
def serve():
    servers = []

    def start(**limits):
        server = make_server(Brightness(), limits=Limits(**limits))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server.server_address[:2]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def post(address, body: bytes, timeout=10.0):
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    conn.request("POST", "/score", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read())
    conn.close()
    return out


def payload(images, prompts=None, metadata=None) -> bytes:
    prompts = ["p"] * len(images) if prompts is None else prompts
    return json.dumps({"images": [encode_image(im) if isinstance(im, Image.Image) else im for im in images],
                       "prompts": prompts, "metadata": metadata}).encode()


def png_header_only(width, height) -> str:
    """A valid PNG whose header claims width x height RGB pixels, with a 1-row IDAT: a bomb's header."""
    import base64

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (1 + 3 * width)))
    return base64.b64encode(png + chunk(b"IEND", b"")).decode()


def read_until_closed(sock) -> bytes:
    """Everything the server sends until it closes the connection (headers and body may come apart)."""
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


def test_good_request_scores(serve):
    address = serve()
    status, reply = post(address, payload([Image.new("RGB", (8, 8), (255, 255, 255)), Image.new("RGB", (8, 8))]))
    assert status == 200
    assert reply["scores"]["brightness"]["data"] == [1.0, 0.0]


def test_request_bytes_limit_is_413_before_reading(serve):
    address = serve(max_request_bytes=1000)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    status, reply = post(address, payload([noise]))  # ~4 kB of JSON
    assert status == 413 and "--max-request-mb" in reply["error"]
    with socket.create_connection(address, timeout=5) as s:  # announced, never sent: answered at once
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 413")


def test_images_per_request_limit_is_413(serve):
    address = serve(max_images=2)
    status, reply = post(address, payload([Image.new("RGB", (8, 8))] * 3))
    assert status == 413 and "3 images" in reply["error"] and "--max-images" in reply["error"]
    assert post(address, payload([Image.new("RGB", (8, 8))] * 2))[0] == 200


def test_pixels_per_image_limit_is_413_before_decoding(serve):
    address = serve()  # default limit 4096 x 4096
    for side in (10_000, 30_000):  # 300 MB and 2.7 GB of RGB if decoded; below and above PIL's own bomb limit
        bomb = png_header_only(side, side)
        assert len(bomb) < 100_000
        status, reply = post(address, payload([bomb]))
        assert status == 413, reply
        assert "images[0]" in reply["error"]
    status, reply = post(serve(max_pixels=100), payload([Image.new("RGB", (11, 10))]))
    assert status == 413 and "11x10 = 110 pixels" in reply["error"]
    # Many images each under the per-image limit: the request's total is bounded too.
    bombs = [png_header_only(4096, 4096)] * 5  # 84 M pixels in all, 250 MB of RGB if decoded; ~20 kB sent
    status, reply = post(address, payload(bombs))
    assert status == 413 and "--max-total-pixels" in reply["error"]
    assert post(serve(max_total_pixels=300), payload([Image.new("RGB", (10, 10))] * 3))[0] == 200
    assert post(serve(max_total_pixels=299), payload([Image.new("RGB", (10, 10))] * 3))[0] == 413


@pytest.mark.parametrize("body,message", [
    ({"images": 5, "prompts": ["p"]}, "'images' must be a list"),
    ({"images": [123], "prompts": ["p"]}, "images[0]: expected a base64 PNG string, got int"),
    ({"images": ["not base64!"], "prompts": ["p"]}, "images[0]: not a base64-encoded image"),
    ({"images": [], "prompts": [1]}, "'prompts' must be a list of strings"),
    ({"images": [], "prompts": [], "metadata": "x"}, "'metadata' must be null or a list"),
    (["a list"], "body must be a JSON object"),
])
def test_wrong_field_types_are_400(serve, body, message):
    status, reply = post(serve(), json.dumps(body).encode())
    assert status == 400 and message in reply["error"]


def test_wrong_types_are_not_retried_by_the_client(serve):
    host, port = serve()
    client = RemoteScorer("brightness", f"http://{host}:{port}", retries=3, backoff=5.0)
    start = time.perf_counter()
    with pytest.raises(RemoteError, match="400"):
        client._score([Image.new("RGB", (8, 8))], [7], None)  # a prompt that is not a string
    assert time.perf_counter() - start < 4.5  # a retry would first sleep backoff = 5 s: 400 is final


class Slow(Brightness):
    """Brightness that takes ``seconds`` per call, or waits for ``gate`` to open."""

    def __init__(self, seconds=0.0, gate=None, fail=False):
        super().__init__()
        self.seconds, self.gate, self.fail = seconds, gate, fail

    def _score(self, images, prompts, metadata):
        if self.gate is not None:
            assert self.gate.wait(30), "test gate never opened"
        time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("scorer broke")
        return super()._score(images, prompts, metadata)


def start_server(scorer, **limits):
    server = make_server(scorer, limits=Limits(**limits))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def open_request(address, content_length=100):
    """A socket that has sent a request's headers and none of its body."""
    s = socket.create_connection(address, timeout=15)
    s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(content_length).encode() + b"\r\n\r\n")
    return s


def test_stalled_client_gets_408_and_is_closed(serve):
    address = serve(request_timeout=0.5)
    with socket.create_connection(address, timeout=15) as s:
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"images\"")  # then nothing
        start = time.perf_counter()
        answer = read_until_closed(s)
        waited = time.perf_counter() - start
    assert answer.startswith(b"HTTP/1.1 408") and b"--request-timeout" in answer
    assert 0.4 < waited < 10.0  # the timeout, plus scheduling slack on a loaded machine
    with socket.create_connection(address, timeout=15) as s:  # not even a request line: just closed
        start = time.perf_counter()
        assert s.recv(100) == b""
        assert 0.4 < time.perf_counter() - start < 10.0


def test_the_deadline_is_for_the_whole_request_not_per_read(serve):
    """A client sending one byte every 0.2 s never stalls for a whole per-read timeout; it must
    still be cut when the request as a whole is late."""
    address = serve(request_timeout=1.0)
    with open_request(address, content_length=1000) as s:
        start = time.perf_counter()
        for _ in range(100):  # at most 20 s of trickling
            try:
                s.sendall(b" ")
            except OSError:  # the server closed on us
                break
            readable, _, _ = select.select([s], [], [], 0.2)
            if readable:
                break
        answer = read_until_closed(s)
        waited = time.perf_counter() - start
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert waited < 10.0


def test_idle_and_trickling_sockets_do_not_starve_a_client():
    """40 connections that send nothing and 8 that send a byte every 0.5 s (each well inside
    the deadline) cost the server no scoring worker: a normal client is answered at once."""
    server = start_server(Brightness(), request_timeout=30.0)
    address = server.server_address[:2]
    idle = [socket.create_connection(address, timeout=5) for _ in range(40)]
    trickling = [open_request(address, content_length=10_000) for _ in range(8)]
    stop = threading.Event()

    def trickle():
        for _ in range(60):  # at most 30 s, stopped by the test long before
            if stop.wait(0.5):
                return
            for s in trickling:
                s.sendall(b" ")

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    try:
        time.sleep(1.2)  # every trickler has sent bytes since it connected
        start = time.perf_counter()
        status, reply = post(address, payload([Image.new("RGB", (8, 8), (255, 255, 255))]))
        answered = time.perf_counter() - start
        assert status == 200 and reply["scores"]["brightness"]["data"] == [1.0]
        assert answered < 2.0, f"a normal request took {answered:.2f} s"
        # The connections cost no threads: the event loop and one scoring thread, whatever is open.
        assert len([t for t in threading.enumerate() if t.name.startswith("reward-scorer")]) == 1
    finally:
        stop.set()
        feeder.join(5)
        for s in idle + trickling:
            s.close()
        server.shutdown()
        server.server_close()


def test_sixteen_clients_on_a_slow_scorer_are_all_answered():
    """16 threads x 3 requests through the real client on a 20-ms scorer: queued, not refused."""
    server = start_server(Slow(seconds=0.02))
    host, port = server.server_address[:2]
    results, errors = [], []

    def client(k):
        scorer = RemoteScorer("brightness", f"http://{host}:{port}", retries=0, timeout=60)
        for j in range(3):
            level = (16 * j + k) * 4
            try:
                got = scorer._score([Image.new("RGB", (8, 8), (level,) * 3)], ["p"], None)
                results.append((level, float(got["brightness"][0])))
            except Exception as err:  # noqa: BLE001 - collected and asserted below
                errors.append(repr(err))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        server.shutdown()
        server.server_close()
    assert errors == []
    assert len(results) == 48
    for level, score in results:  # each client got its own answer
        assert score == pytest.approx(level / 255, abs=1e-6)


def test_full_queue_is_busy_and_the_client_waits_for_it():
    gate = threading.Event()
    server = start_server(Slow(gate=gate), max_queue=1)
    address = server.server_address[:2]
    url = "http://%s:%d" % address
    try:
        first = threading.Thread(target=lambda: post(address, payload([Image.new("RGB", (8, 8))]), timeout=30))
        first.start()
        for _ in range(100):  # until the first request holds the only queue place
            if server._queued == 1:
                break
            time.sleep(0.05)
        assert server._queued == 1
        conn = http.client.HTTPConnection(*address, timeout=10)
        conn.request("POST", "/score", body=payload([Image.new("RGB", (8, 8))]))
        resp = conn.getresponse()
        assert resp.status == 503 and resp.getheader("Retry-After") == "1" and b"busy" in resp.read()
        conn.close()
        # The client tells busy from down: a short busy_wait ends in ServerBusy, not "unreachable".
        with pytest.raises(ServerBusy) as err:
            RemoteScorer("brightness", url, busy_wait=0.5, retries=0)._score([Image.new("RGB", (8, 8))], ["p"], None)
        assert "busy" in str(err.value) and "unreachable" not in str(err.value)
        # A patient client waits until the queue frees up, with no retry counted.
        got = []
        waiter = threading.Thread(target=lambda: got.append(RemoteScorer("brightness", url, retries=0)._score(
            [Image.new("RGB", (8, 8), (255, 255, 255))], ["p"], None)))
        waiter.start()
        time.sleep(1.5)  # at least one busy answer and one wait
        assert not got
        gate.set()
        waiter.join(30)
        first.join(30)
        assert got and float(got[0]["brightness"][0]) == 1.0
    finally:
        gate.set()
        server.shutdown()
        server.server_close()


def test_a_server_that_answers_errors_is_not_called_unreachable():
    server = start_server(Slow(fail=True))
    url = "http://%s:%d" % server.server_address[:2]
    try:
        with pytest.raises(ServerUnavailable) as err:
            RemoteScorer("brightness", url, retries=1, backoff=0.01)._score([Image.new("RGB", (8, 8))], ["p"], None)
    finally:
        server.shutdown()
        server.server_close()
    assert err.value.answered and "HTTP 500" in str(err.value) and "scorer broke" in str(err.value)
    assert "unreachable" not in str(err.value)


def test_open_connections_are_bounded(serve):
    address = serve(max_connections=2, request_timeout=1.5)
    held = [open_request(address) for _ in range(2)]
    time.sleep(0.2)
    start = time.perf_counter()
    status, reply = post(address, payload([Image.new("RGB", (8, 8))]))
    assert status == 503 and "--max-connections" in reply["error"]
    assert time.perf_counter() - start < 1.5  # refused at once, not after the held ones time out
    for s in held:
        assert read_until_closed(s).startswith(b"HTTP/1.1 408")  # the held ones time out ...
        s.close()
    time.sleep(0.1)
    assert post(address, payload([Image.new("RGB", (8, 8))]))[0] == 200  # ... and the slots are free again


def test_a_refused_client_still_reads_its_503_after_sending_its_body(serve):
    """The 503 goes out on accept; a client whose request arrives after it (here: 0.1 s later, in
    two sends as http.client makes them) must still read the answer, not a broken pipe or a
    connection reset (the server drains what the client sends before closing)."""
    address = serve(max_connections=1, request_timeout=2.0)
    stalled = open_request(address, content_length=50)  # holds the only connection
    time.sleep(0.2)
    body = payload([Image.new("RGB", (64, 64))] * 8)
    with socket.create_connection(address, timeout=5) as s:
        time.sleep(0.1)  # the server has answered 503 by now
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n")
        time.sleep(0.05)  # headers and body in two sends, as http.client does
        s.sendall(body)
        answer = read_until_closed(s)
    assert answer.startswith(b"HTTP/1.1 503") and b"busy" in answer
    stalled.close()


def test_load_script_reports_every_request(tmp_path):
    """scripts/reward_server_load.py against a real server process, with hostile sockets open."""
    out = tmp_path / "load.json"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, os.path.join(root, "scripts", "reward_server_load.py"), "--reward",
                           "brightness", "--clients", "4", "--requests", "2", "--idle", "3", "--trickle", "2",
                           "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["answered"] == 8 and result["failed"] == 0 and len(result["latencies_s"]) == 8
    assert result["latency_s"]["p50"] <= result["latency_s"]["p99"] <= result["latency_s"]["max"]
    assert "p99" in proc.stdout
