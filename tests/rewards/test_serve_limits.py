"""The reward server's limits, each hit by a real client over loopback: request bytes, images per
request, pixels per image (a PNG bomb), wrong field types, stalled clients, the bounded pool."""
import http.client
import json
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from diffusion_opd.rewards.base import Scorer
from diffusion_opd.rewards.remote import RemoteError, RemoteScorer, encode_image
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
        assert s.recv(100).startswith(b"HTTP/1.0 413")


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


def test_stalled_client_gets_408_and_is_closed(serve):
    address = serve(read_timeout=0.5)
    with socket.create_connection(address, timeout=15) as s:
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"images\"")  # then nothing
        start = time.perf_counter()
        answer = read_until_closed(s)
        waited = time.perf_counter() - start
    assert answer.startswith(b"HTTP/1.0 408") and b"--read-timeout" in answer
    assert 0.4 < waited < 10.0  # the timeout, plus scheduling slack on a loaded machine
    with socket.create_connection(address, timeout=15) as s:  # not even a request line: just closed
        start = time.perf_counter()
        assert s.recv(100) == b""
        assert 0.4 < time.perf_counter() - start < 10.0


def test_worker_pool_is_bounded(serve):
    address = serve(workers=2, read_timeout=1.5)
    stalled = [socket.create_connection(address, timeout=5) for _ in range(2)]
    for s in stalled:
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n")
    time.sleep(0.2)  # both workers now wait for bodies that never come
    start = time.perf_counter()
    status, reply = post(address, payload([Image.new("RGB", (8, 8))]))
    assert status == 503 and "busy" in reply["error"]
    assert time.perf_counter() - start < 1.5  # refused at once; queued, it would wait out the 1.5 s stalls
    workers = [t for t in threading.enumerate() if t.name.startswith("reward-server")]
    assert len(workers) == 2
    for s in stalled:
        assert s.recv(100).startswith(b"HTTP/1.0 408")  # the stalls time out ...
        s.close()
    time.sleep(0.1)
    assert post(address, payload([Image.new("RGB", (8, 8))]))[0] == 200  # ... and the workers are free again


def test_a_refused_client_still_reads_its_503_after_sending_its_body(serve):
    """The 503 goes out on accept; a client whose request arrives after it (here: 0.1 s later, in
    two sends as http.client makes them) must still read the answer, not a broken pipe or a
    connection reset (the server drains what the client sends before closing)."""
    address = serve(workers=1, read_timeout=2.0)
    stalled = socket.create_connection(address, timeout=5)
    stalled.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n")  # holds the only worker
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
