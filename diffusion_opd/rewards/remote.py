"""Talking to reward servers over HTTP: the client side of ``python -m diffusion_opd.rewards.serve``
(``RemoteScorer``, what ``load_reward(name, remote=URL)`` returns) and the JSON POST with retries
shared with the UnifiedReward client.

Wire format (both directions JSON): images travel as base64 PNG; score arrays as
``{key: {"dtype": "float32", "data": [...]}}`` so that the client gets back exactly the arrays
the server computed (NaN included: Python's json writes and reads it).
"""
from __future__ import annotations

import base64
import io
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Optional

import numpy as np

from .base import Scorer


class RemoteError(RuntimeError):
    """A reward server answered with an error that retrying will not fix (HTTP 4xx)."""


class ServerUnavailable(ConnectionError):
    """No usable answer from a server after every retry (unreachable, timeouts, 5xx).
    ``answered`` tells a server that answered with errors from one that never answered."""

    def __init__(self, message: str, answered: bool = False):
        super().__init__(message)
        self.answered = answered


class ServerBusy(ServerUnavailable):
    """The server kept answering "busy" (503/429 with Retry-After) for longer than the client waits."""

    def __init__(self, message: str):
        super().__init__(message, answered=True)


# ----------------------------------------------------------------------------- codec
def encode_image(image) -> str:
    """A PIL image as base64 PNG text (lossless, so the server scores the exact pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(text: str):
    """The PIL image of ``encode_image`` (also accepts a ``data:...;base64,`` URL)."""
    from PIL import Image

    if text.startswith("data:"):
        text = text.split(",", 1)[1]
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def encode_arrays(arrays: dict[str, np.ndarray]) -> dict[str, dict]:
    """Score arrays as JSON-able ``{key: {"dtype", "data"}}``."""
    return {k: {"dtype": np.asarray(v).dtype.str, "data": np.asarray(v).tolist()} for k, v in arrays.items()}


def decode_arrays(payload: dict[str, dict]) -> dict[str, np.ndarray]:
    """Inverse of ``encode_arrays``."""
    return {k: np.asarray(v["data"], dtype=np.dtype(v["dtype"])) for k, v in payload.items()}


# ----------------------------------------------------------------------------- HTTP
def _opener(url: str):
    """Loopback requests bypass any HTTP proxy from the environment (it could not reach us)."""
    host = urllib.parse.urlparse(url).hostname or ""
    if host in ("127.0.0.1", "localhost", "::1"):
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


def _retry_after(err: urllib.error.HTTPError) -> Optional[float]:
    """Seconds from a busy answer's ``Retry-After`` (None: not a busy answer, or a date we do not parse)."""
    if err.code not in (429, 503):
        return None
    try:
        seconds = float(err.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return seconds if seconds >= 0 and seconds == seconds else None


def request_with_retries(
    url: str,
    payload: Optional[dict] = None,
    timeout: float = 60.0,
    retries: int = 3,
    backoff: float = 1.0,
    headers: Optional[dict] = None,
    busy_wait: float = 600.0,
) -> bytes:
    """POST ``payload`` as JSON (GET when None) and return the body.

    * busy (503 or 429 with ``Retry-After``): wait that long (at most 10 s at a time) and ask
      again, for up to ``busy_wait`` seconds in all; these waits do not use up ``retries``.
      Still busy after that: ``ServerBusy``.
    * connection errors, timeouts, other 5xx and 429: retried ``retries`` times with exponential
      backoff (backoff x 2^k seconds), then ``ServerUnavailable`` naming the URL and the last
      error (``answered`` says whether the server answered at all).
    * other HTTP errors: ``RemoteError`` at once (the request itself is wrong).
    """
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    head = {"Content-Type": "application/json", **(headers or {})}
    opener = _opener(url)
    last, answered, failures, busy_since = "no attempt", False, 0, None
    while True:  # bounded: each pass either returns, raises, or uses up a retry or busy time
        try:
            with opener.open(urllib.request.Request(url, data=data, headers=head), timeout=timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as err:
            body = err.read()[:500].decode("utf-8", "replace")
            if err.code < 500 and err.code != 429:
                raise RemoteError(f"{url}: HTTP {err.code}: {body}") from None
            wait = _retry_after(err)
            if wait is not None:
                busy_since = time.monotonic() if busy_since is None else busy_since
                waited = time.monotonic() - busy_since
                if waited >= busy_wait:
                    raise ServerBusy(f"{url}: busy for {waited:.0f} s (HTTP {err.code}: {body})")
                time.sleep(min(max(wait, 0.05), 10.0, busy_wait - waited))
                continue
            last, answered = f"HTTP {err.code}: {body}", True
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError) as err:
            reason = getattr(err, "reason", err)
            last, answered = f"{type(reason).__name__}: {reason}", False
        failures += 1
        if failures > retries:
            raise ServerUnavailable(f"{url}: no answer after {failures} attempt(s); last error: {last}", answered)
        time.sleep(backoff * 2 ** (failures - 1))


# ----------------------------------------------------------------------------- client
class RemoteScorer(Scorer):
    """A scorer living in another process: ``python -m diffusion_opd.rewards.serve --reward NAME``.

    Options: ``timeout`` (seconds per request), ``retries``, ``backoff``, ``busy_wait`` (seconds
    to keep waiting on a busy server), ``batch_size`` (images per request). The reward's own
    options are set on the server's command line.
    """

    def __init__(self, name: str, url: str, timeout: float = 600.0, retries: int = 3, backoff: float = 1.0,
                 batch_size: int = 64, busy_wait: float = 3600.0, **options: Any):
        if options:
            raise TypeError(
                f"remote reward '{name}': options {sorted(options)} belong to the server; start it with "
                f"`python -m diffusion_opd.rewards.serve --reward {name} --option KEY=VALUE ...`"
            )
        super().__init__(device="cpu", batch_size=batch_size)
        self.name, self.url = name, url.rstrip("/")
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.busy_wait = float(busy_wait)
        self.server_info: dict = {}

    def _call(self, path: str, payload: Optional[dict] = None) -> dict:
        try:
            body = request_with_retries(self.url + path, payload, self.timeout, self.retries, self.backoff,
                                        busy_wait=self.busy_wait)
        except ServerBusy as err:
            raise ServerBusy(f"reward server for '{self.name}' at {self.url} is up but stayed busy ({err}); "
                             f"raise busy_wait (now {self.busy_wait:g} s) or the server's --max-queue") from None
        except ServerUnavailable as err:
            if err.answered:
                raise ServerUnavailable(f"reward server for '{self.name}' at {self.url} answered with errors "
                                        f"({err}); see the server's log", answered=True) from None
            raise ServerUnavailable(
                f"reward server for '{self.name}' at {self.url} is unreachable ({err}). Start it with: "
                f"python -m diffusion_opd.rewards.serve --reward {self.name} --port "
                f"{urllib.parse.urlparse(self.url).port or 80}"
            ) from None
        return json.loads(body)

    def _load(self) -> None:
        self.server_info = self._call("/health")
        if self.server_info.get("reward") != self.name:
            raise RemoteError(f"server at {self.url} serves '{self.server_info.get('reward')}', not '{self.name}'")

    def _score(self, images, prompts, metadata):
        payload = {"images": [encode_image(im) for im in images], "prompts": prompts, "metadata": metadata}
        reply = self._call("/score", payload)
        # The server's counters (NaN causes...) are server-wide; mirror them here.
        self.stats.clear()
        self.stats.update(reply.get("stats", {}))
        return decode_arrays(reply["scores"])
