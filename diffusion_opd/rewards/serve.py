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
* 408: a request that has not arrived completely within ``--request-timeout`` seconds of the
  connection opening (a whole-request deadline: a client trickling a byte a second is cut too);
* 503 with ``Retry-After``: busy (more than ``--max-queue`` requests wait for the scorer, more
  than ``--max-buffered-mb`` of request bytes are held, or more than ``--max-connections``
  connections are open). Our client waits and retries on it; a server that does not answer
  at all is "unreachable";
* 500: the scorer itself failed.

The model loads before the port opens (so /health answering means ready). An asyncio front end
reads each request completely before it is queued for the one scoring thread, so slow, stalled
or idle sockets never hold the scorer; requests are scored one at a time, in arrival order.
``--port 0`` picks a free port; the first stdout line is ``serving REWARD on http://HOST:PORT``.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import http.client
import io
import json
import socket
import sys
import threading
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
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
    request_timeout: float = 60.0  # seconds from connecting to the last byte of the request
    max_queue: int = 64  # requests read and waiting for the scorer; more get 503 (busy)
    max_buffered_bytes: int = 1024 * 2**20  # request bytes held at once (being read + queued)
    max_connections: int = 512  # open connections (idle ones cost a file descriptor each)


HEADER_BYTES = 64 * 1024  # request line + headers


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


def _score_body(scorer, body: bytes, limits: Limits) -> tuple[int, dict]:
    """Parse one request body and score it (on the scoring thread): (HTTP status, JSON reply)."""
    try:
        images, prompts, metadata = parse_score_request(body, limits)
    except RequestError as err:
        return err.status, {"error": f"bad request: {err}"}
    try:
        scores = scorer(images, prompts, metadata)
        stats = dict(scorer.stats)
    except (ValueError, TypeError) as err:  # the scorer refused the input (lengths, metadata...)
        return 400, {"error": str(err)}
    except Exception as err:
        traceback.print_exc()
        return 500, {"error": f"{type(err).__name__}: {err}"}
    return 200, {"scores": encode_arrays(scores), "stats": stats}


class _Answer(Exception):
    """Ends a request early with this answer (its body may still be arriving)."""

    def __init__(self, status: int, message: str, retry_after: Optional[int] = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class _Silent(Exception):
    """Close the connection without an answer (nothing was asked, or the client left)."""


class RewardServer:
    """The HTTP front end: an asyncio loop reads every request completely (within the whole-
    request deadline ``limits.request_timeout``) and only then queues it for the one scoring
    thread. A slow, stalled or idle socket therefore costs a coroutine and a file descriptor,
    never the scorer; the only refusals for load are a full queue or too many buffered bytes
    (503 with ``Retry-After``: busy, the client waits) and too many open connections.

    Same surface as ``http.server``'s servers: ``server_address``, ``serve_forever()`` (blocks),
    ``shutdown()`` (from another thread), ``server_close()``.
    """

    def __init__(self, scorer, host: str, port: int, options: dict | None, limits: Limits):
        self.scorer, self.options, self.limits = scorer, options or {}, limits
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=128)
        self.server_address = self.socket.getsockname()
        # One scoring thread: models are not thread-safe, and one request at a time keeps memory
        # at one decoded request whatever the queue holds (queued requests are raw bytes).
        self._scoring = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-scorer")
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stop: Optional[asyncio.Event] = None
        self._stopped = threading.Event()
        self._connections: set = set()
        self._queued = 0  # requests read completely, waiting for or in the scorer
        self._buffered = 0  # request bytes held in memory (being read + queued)

    # ------------------------------------------------------------------ lifecycle
    def serve_forever(self, poll_interval: float | None = None) -> None:  # noqa: ARG002 - http.server's signature
        try:
            asyncio.run(self._serve())
        finally:
            self._stopped.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stop is not None and not self._stopped.is_set():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._stopped.wait(timeout)

    def server_close(self) -> None:
        self.socket.close()
        self._scoring.shutdown(wait=False, cancel_futures=True)

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_server(self._connection, sock=self.socket, limit=HEADER_BYTES)
        try:
            await self._stop.wait()
        finally:
            server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)

    # ------------------------------------------------------------------ one connection
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        held = [0]  # this request's bytes counted in self._buffered
        try:
            if len(self._connections) > self.limits.max_connections:
                raise _Answer(503, f"server busy: {self.limits.max_connections} connections open "
                                   "(--max-connections); retry later", retry_after=1)
            status, payload = await self._request(reader, held)
            await self._send(writer, status, payload)
        except _Answer as answer:
            await self._send(writer, answer.status, {"error": str(answer)}, answer.retry_after)
        except _Silent:
            pass
        finally:
            self._buffered -= held[0]
            self._connections.discard(task)
            await self._close(reader, writer)

    async def _request(self, reader: asyncio.StreamReader, held: list) -> tuple[int, dict]:
        limits = self.limits
        deadline = self._loop.time() + limits.request_timeout
        started = [False]  # a connection that never sent a byte is closed without an answer
        try:
            async with asyncio.timeout_at(deadline):
                method, path, headers = await self._read_head(reader, started)
                if method == "GET":
                    if path.rstrip("/") == "/health":
                        return 200, {"status": "ok", "reward": self.scorer.name, "options": self.options}
                    raise _Answer(404, f"unknown path {path}; use GET /health or POST /score")
                if method != "POST":
                    raise _Answer(405, f"method {method} not allowed; use GET /health or POST /score")
                if path.rstrip("/") != "/score":
                    raise _Answer(404, f"unknown path {path}; use POST /score")
                body = await self._read_body(reader, headers, held)
        except TimeoutError:
            if not started[0]:
                raise _Silent() from None
            raise _Answer(408, f"the request did not arrive completely within {limits.request_timeout} s "
                               "(--request-timeout)") from None
        if self._queued >= limits.max_queue:
            raise _Answer(503, f"server busy: {self._queued} requests wait for the scorer (--max-queue); "
                               "retry later", retry_after=1)
        self._queued += 1
        try:
            return await self._loop.run_in_executor(self._scoring, _score_body, self.scorer, body, limits)
        finally:
            self._queued -= 1

    async def _read_head(self, reader: asyncio.StreamReader, started: list) -> tuple[str, str, Any]:
        try:
            first = await reader.readexactly(1)
        except asyncio.IncompleteReadError:
            raise _Silent() from None
        started[0] = True
        try:
            head = first + await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            raise _Silent() from None
        except asyncio.LimitOverrunError:
            raise _Answer(431, f"request line and headers are over {HEADER_BYTES} bytes") from None
        line, _, rest = head.partition(b"\r\n")
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise _Answer(400, f"malformed request line {line[:100]!r}")
        return parts[0], parts[1], http.client.parse_headers(io.BytesIO(rest))

    async def _read_body(self, reader: asyncio.StreamReader, headers, held: list) -> bytes:
        limits = self.limits
        length = headers.get("Content-Length")
        if length is None:
            raise _Answer(411, "Content-Length header required")
        try:
            size = int(length)
        except ValueError:
            raise _Answer(400, f"Content-Length {length!r} is not a number") from None
        if size < 0:
            raise _Answer(400, f"Content-Length {size} is negative")
        if size > limits.max_request_bytes:
            raise _Answer(413, f"request body of {size} bytes is over the server's limit of "
                               f"{limits.max_request_bytes} (--max-request-mb): send smaller batches")
        chunks, received = [], 0
        while received < size:
            chunk = await reader.read(min(size - received, 2**20))
            if not chunk:
                raise _Silent()  # the client hung up mid-body: nobody to answer
            if self._buffered + len(chunk) > limits.max_buffered_bytes:
                raise _Answer(503, f"server busy: {self._buffered} request bytes held (--max-buffered-mb); "
                                   "retry later", retry_after=1)
            self._buffered += len(chunk)
            held[0] += len(chunk)
            received += len(chunk)
            chunks.append(chunk)
        return b"".join(chunks)

    # ------------------------------------------------------------------ answers
    async def _send(self, writer: asyncio.StreamWriter, status: int, payload: dict,
                    retry_after: Optional[int] = None) -> None:
        body = json.dumps(payload).encode("utf-8")
        head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "Content-Type: application/json",
                f"Content-Length: {len(body)}", "Connection: close"]
        if retry_after is not None:
            head.append(f"Retry-After: {retry_after}")
        try:
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            await asyncio.wait_for(writer.drain(), self.limits.request_timeout)
        except (OSError, TimeoutError):
            return
        peer = writer.get_extra_info("peername")
        sys.stderr.write(f"[reward-server] {peer[0] if peer else '-'} {status}\n")

    async def _close(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     seconds: float = 0.25, max_bytes: int = 4 * 2**20) -> None:
        """Half-close, discard what the client is still sending, then close. Closing with unread
        request bytes makes the kernel send a reset, and a client answered early (413, 503)
        would fail with a broken pipe instead of reading the answer. Bounded in time and bytes."""
        try:
            if writer.can_write_eof():
                writer.write_eof()
            received = 0
            async with asyncio.timeout(seconds):
                while received < max_bytes:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    received += len(chunk)
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()



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
                limits: Limits = Limits()) -> RewardServer:
    """A server bound to ``host:port`` (not yet serving) that scores with ``scorer`` within ``limits``."""
    return RewardServer(scorer, host, port, options, limits)


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
    parser.add_argument("--request-timeout", "--read-timeout", dest="request_timeout", type=float,
                        default=defaults.request_timeout,
                        help="seconds a client has to send its whole request (408 after)")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue,
                        help="requests waiting for the scorer (503 busy above; clients wait and retry)")
    parser.add_argument("--max-buffered-mb", type=float, default=defaults.max_buffered_bytes / 2**20,
                        help="request bytes held in memory at once, being read or queued (503 busy above)")
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections,
                        help="open connections (503 busy above)")
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
    for flag in ("max_request_mb", "max_images", "max_pixels", "max_total_pixels", "request_timeout",
                 "max_queue", "max_buffered_mb", "max_connections"):
        if not getattr(args, flag) > 0:  # also refuses NaN
            parser.error(f"--{flag.replace('_', '-')} must be > 0")
    if args.max_buffered_mb < args.max_request_mb:
        parser.error("--max-buffered-mb must be at least --max-request-mb (else the largest request never fits)")
    scorer = load_reward(args.reward, **options).load()
    limits = Limits(max_request_bytes=int(args.max_request_mb * 2**20), max_images=args.max_images,
                    max_pixels=args.max_pixels, max_total_pixels=args.max_total_pixels,
                    request_timeout=args.request_timeout, max_queue=args.max_queue,
                    max_buffered_bytes=int(args.max_buffered_mb * 2**20), max_connections=args.max_connections)
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
