"""Serve any reward over HTTP on loopback, so that a reward with conflicting dependencies (mmdet,
paddle, image-reward) runs in its own environment:

    python -m diffusion_opd.rewards.serve --reward geneval --port 18085 --device cuda:0 \\
        --option detector=mmdet
    # in the training environment:
    load_reward("geneval", remote="http://127.0.0.1:18085")

Endpoints: ``GET /health`` -> {"status": "ok", "reward", "options"}; ``POST /score`` with
{"images": [base64 PNG], "prompts": [...], "metadata": [...] | null} -> {"scores": {key:
{"dtype", "data"}}, "stats": the scorer's counters}. Errors come with {"error": ...}:

* 400: malformed JSON, a field of the wrong type or length (not retried by clients);
* 411 / 413: no Content-Length; a body over ``--max-request-mb``, more than ``--max-images``
  images, an image over ``--max-pixels`` pixels or images over ``--max-total-pixels`` in all
  (checked from the PNG headers before any pixel is decoded, so a 2 MB request of
  decompression bombs cannot allocate gigabytes);
* 408: a client that stops sending for ``--read-timeout`` seconds (its connection is closed);
* 503: every one of the ``--workers`` connection threads is busy (retry later);
* 500: the scorer itself failed.

The model loads before the port opens (so /health answering means ready); requests are
scored one at a time. ``--port 0`` picks a free port; the first stdout line is
``serving REWARD on http://HOST:PORT``.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import socket
import sys
import threading
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Optional

from . import check_reward_name, load_reward, reward_names
from .remote import encode_arrays


@dataclass(frozen=True)
class Limits:
    """What one request may cost the server (defaults fit 64 images of 1024 px per request)."""

    max_request_bytes: int = 256 * 2**20
    max_images: int = 256
    max_pixels: int = 4096 * 4096
    max_total_pixels: int = 64 * 1024 * 1024  # all images of one request: ~200 MB of decoded RGB
    read_timeout: float = 30.0  # seconds without a byte from the client
    workers: int = 8  # connection threads; more clients at once get 503


class RequestError(Exception):
    """The client's fault: answered with ``status`` and never retried by our client (4xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _decode_limited(text: Any, index: int, limits: Limits):
    """One base64 PNG -> PIL image with only its header read, refusing wrong types and oversized images."""
    from PIL import Image

    if not isinstance(text, str):
        raise RequestError(400, f"images[{index}]: expected a base64 PNG string, got {type(text).__name__}")
    if text.startswith("data:"):
        text = text.split(",", 1)[1]
    try:
        with warnings.catch_warnings():  # PIL's bomb warning: our own limit below is the stricter one
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
    except Image.DecompressionBombError as err:
        raise RequestError(413, f"images[{index}]: {err}") from None
    except (binascii.Error, ValueError, OSError) as err:
        raise RequestError(400, f"images[{index}]: not a base64-encoded image ({type(err).__name__}: {err})") from None
    width, height = image.size  # from the header: nothing decoded yet
    if width * height > limits.max_pixels:
        raise RequestError(413, f"images[{index}]: {width}x{height} = {width * height} pixels is over the "
                                f"server's limit of {limits.max_pixels} (--max-pixels)")
    return image


def _load(image, index: int):
    try:
        image.load()
    except (OSError, ValueError) as err:
        raise RequestError(400, f"images[{index}]: cannot decode ({type(err).__name__}: {err})") from None
    return image


def parse_score_request(body: bytes, limits: Limits) -> tuple[list, list[str], Optional[list]]:
    """The /score JSON body -> (images, prompts, metadata), or :class:`RequestError`."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"body is not JSON: {err}") from None
    if not isinstance(request, dict):
        raise RequestError(400, f"body must be a JSON object, got {type(request).__name__}")
    images, prompts, metadata = request.get("images"), request.get("prompts"), request.get("metadata")
    if not isinstance(images, list):
        raise RequestError(400, f"'images' must be a list of base64 PNG strings, got {type(images).__name__}")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError(400, "'prompts' must be a list of strings")
    if metadata is not None and (not isinstance(metadata, list)
                                 or not all(m is None or isinstance(m, dict) for m in metadata)):
        raise RequestError(400, "'metadata' must be null or a list of objects")
    if len(images) > limits.max_images:
        raise RequestError(413, f"{len(images)} images in one request; the server takes at most "
                                f"{limits.max_images} (--max-images): send smaller batches")
    opened = [_decode_limited(t, i, limits) for i, t in enumerate(images)]  # headers only
    total = sum(im.size[0] * im.size[1] for im in opened)
    if total > limits.max_total_pixels:
        raise RequestError(413, f"{total} pixels in one request is over the server's limit of "
                                f"{limits.max_total_pixels} (--max-total-pixels): send smaller batches")
    return [_load(im, i) for i, im in enumerate(opened)], prompts, metadata


def _lingering_close(sock: socket.socket, seconds: float = 0.25, max_bytes: int = 4 * 2**20) -> None:
    """Half-close after an early answer and discard what the client is still sending.

    Closing a socket with unread request bytes makes the kernel send a reset, and the client
    then fails with a broken pipe / connection reset instead of reading our answer (a race the
    503 path hits whenever the client's body arrives after the refusal). Bounded in time and
    bytes: the accept loop is held for at most ``seconds``.
    """
    sock.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + seconds
    received = 0
    while received < max_bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, OSError):
            break
        if not chunk:
            break
        received += len(chunk)


class BoundedHTTPServer(HTTPServer):
    """An HTTP server whose connections run on a fixed pool of ``workers`` threads.

    (``ThreadingHTTPServer`` starts one thread per connection, without bound.) A connection
    arriving while every worker is busy gets an immediate 503 instead of a thread.
    """

    daemon_threads = True

    def __init__(self, address, handler, workers: int):
        super().__init__(address, handler)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward-server")
        self._slots = threading.Semaphore(workers)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            body = json.dumps({"error": "server busy: every worker is handling a request; retry later"}).encode()
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                _lingering_close(request)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        self._pool.submit(self._work, request, client_address)

    def _work(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def server_close(self):
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` -> (key, value); the value is read as JSON when it parses (numbers, true,
    null, lists), else kept as a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option expects KEY=VALUE, got '{text}'")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def make_server(scorer, host: str = "127.0.0.1", port: int = 0, options: dict | None = None,
                limits: Limits = Limits()) -> BoundedHTTPServer:
    """An HTTP server (not yet serving) that scores with ``scorer`` within ``limits``."""
    lock = threading.Lock()  # one scoring call at a time: models are not thread-safe

    class Handler(BaseHTTPRequestHandler):
        timeout = limits.read_timeout  # socket timeout for every read from the client

        def _reply(self, code: int, payload: dict) -> None:
            body = json.dumps(payload).encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if code >= 400:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 - http.server naming
            if self.path.rstrip("/") == "/health":
                self._reply(200, {"status": "ok", "reward": scorer.name, "options": options or {}})
            else:
                self._reply(404, {"error": f"unknown path {self.path}; use GET /health or POST /score"})

        def _read_body(self) -> bytes:
            length = self.headers.get("Content-Length")
            if length is None:
                raise RequestError(411, "Content-Length header required")
            try:
                size = int(length)
            except ValueError:
                raise RequestError(400, f"Content-Length {length!r} is not a number") from None
            if size < 0:
                raise RequestError(400, f"Content-Length {size} is negative")
            if size > limits.max_request_bytes:
                raise RequestError(413, f"request body of {size} bytes is over the server's limit of "
                                        f"{limits.max_request_bytes} (--max-request-mb): send smaller batches")
            try:
                body = self.rfile.read(size)
            except (socket.timeout, TimeoutError):
                raise RequestError(408, f"no data from the client for {limits.read_timeout} s (--read-timeout)") from None
            if len(body) != size:
                raise RequestError(400, f"body ended after {len(body)} of {size} bytes")
            return body

        def do_POST(self):  # noqa: N802
            if self.path.rstrip("/") != "/score":
                self._reply(404, {"error": f"unknown path {self.path}; use POST /score"})
                return
            try:
                images, prompts, metadata = parse_score_request(self._read_body(), limits)
            except RequestError as err:
                self._reply(err.status, {"error": f"bad request: {err}"})
                return
            try:
                with lock:
                    scores = scorer(images, prompts, metadata)
                    stats = dict(scorer.stats)
            except (ValueError, TypeError) as err:  # the scorer refused the input (lengths, metadata...)
                self._reply(400, {"error": str(err)})
                return
            except Exception as err:
                traceback.print_exc()
                self._reply(500, {"error": f"{type(err).__name__}: {err}"})
                return
            self._reply(200, {"scores": encode_arrays(scores), "stats": stats})

        def log_message(self, fmt, *args):  # keep stdout for the "serving" line; log to stderr
            sys.stderr.write("[reward-server] " + (fmt % args) + "\n")

    return BoundedHTTPServer((host, port), Handler, limits.workers)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point (see module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward", required=True, help=f"one of: {', '.join(reward_names())}")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port (printed on stdout)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address; keep loopback (there is no authentication)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    defaults = Limits()
    parser.add_argument("--max-request-mb", type=float, default=defaults.max_request_bytes / 2**20,
                        help="largest request body (413 above)")
    parser.add_argument("--max-images", type=int, default=defaults.max_images, help="images per request (413 above)")
    parser.add_argument("--max-pixels", type=int, default=defaults.max_pixels, help="pixels per image (413 above)")
    parser.add_argument("--max-total-pixels", type=int, default=defaults.max_total_pixels,
                        help="pixels of all images of one request (413 above)")
    parser.add_argument("--read-timeout", type=float, default=defaults.read_timeout,
                        help="seconds a client may stall mid-request before its connection is closed (408)")
    parser.add_argument("--workers", type=int, default=defaults.workers,
                        help="connection threads (503 when all are busy); scoring itself is one at a time")
    parser.add_argument("--option", action="append", type=parse_option, default=[], metavar="KEY=VALUE",
                        help="scorer option, repeatable (e.g. --option backend=paddleocr)")
    args = parser.parse_args(argv)
    try:
        check_reward_name(args.reward)
    except ValueError as err:
        parser.error(str(err))
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {args.host}: anyone who can reach it can use this reward server", file=sys.stderr)
    options = dict(args.option)
    options["device"] = args.device
    if args.batch_size:
        options["batch_size"] = args.batch_size
    for flag in ("max_request_mb", "max_images", "max_pixels", "max_total_pixels", "read_timeout", "workers"):
        if not getattr(args, flag) > 0:
            parser.error(f"--{flag.replace('_', '-')} must be > 0")
    scorer = load_reward(args.reward, **options).load()
    limits = Limits(max_request_bytes=int(args.max_request_mb * 2**20), max_images=args.max_images,
                    max_pixels=args.max_pixels, max_total_pixels=args.max_total_pixels,
                    read_timeout=args.read_timeout, workers=args.workers)
    server = make_server(scorer, args.host, args.port, options, limits)
    host, port = server.server_address[:2]
    print(f"serving {args.reward} on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    from ..errors import run_cli

    sys.exit(run_cli(main))  # a missing reward checkpoint: one line saying how to get it
