#!/usr/bin/env python
"""Load on a real reward server: concurrent clients (the library's own client), optionally with
idle and trickling sockets held open the whole time; reports every request's latency.

    python scripts/reward_server_load.py --reward ocr --clients 16 --requests 3 \
        --idle 40 --trickle 8 --output outputs/reward_server_ocr.json

Starts ``python -m diffusion_opd.rewards.serve --reward REWARD --port 0`` on loopback, waits for
it to load, then each client thread sends ``--requests`` requests of ``--images`` rendered text
images one after the other. Writes JSON (latencies, p50 / p99 / max, failures, the server's
peak resident memory) and prints a one-line summary. Figures are for the machine it runs on.
"""
import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from diffusion_opd.errors import UserError, run_cli  # noqa: E402
from diffusion_opd.rewards.remote import RemoteScorer  # noqa: E402


def text_image(text: str):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (256, 128), "white")
    ImageDraw.Draw(image).text((20, 50), text, fill="black")
    return image


def start_server(reward: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "diffusion_opd.rewards.serve", "--reward", reward, "--port", "0",
                             "--device", "cpu"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line: list = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(300)
    if not line or " on http://" not in line[0]:
        proc.kill()
        raise UserError(f"the {reward} reward server did not start (first line: {line[:1]})")
    return proc, line[0].split(" on ")[1].strip()


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM, Linux), NaN elsewhere."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for row in f:
                if row.startswith("VmHWM:"):
                    return int(row.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def percentile(values: list, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reward", default="ocr")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=3, help="requests per client, one after the other")
    p.add_argument("--images", type=int, default=1, help="images per request")
    p.add_argument("--idle", type=int, default=0, help="sockets held open that send nothing")
    p.add_argument("--trickle", type=int, default=0, help="sockets held open sending one byte every 2 s")
    p.add_argument("--output", help="JSON file to write")
    args = p.parse_args(argv)
    if min(args.clients, args.requests, args.images) < 1 or min(args.idle, args.trickle) < 0:
        raise UserError("--clients, --requests and --images must be >= 1; --idle and --trickle >= 0")
    proc, url = start_server(args.reward)
    host, port = url.rsplit("/", 1)[-1].split(":")
    stop = threading.Event()
    held = [socket.create_connection((host, int(port)), timeout=10) for _ in range(args.idle)]
    trickling = [socket.create_connection((host, int(port)), timeout=10) for _ in range(args.trickle)]
    for s in trickling:
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")

    def trickle():
        while not stop.wait(2.0):
            for s in list(trickling):
                try:
                    s.sendall(b" ")
                except OSError:  # cut by the server's whole-request deadline: open a new one
                    trickling.remove(s)
                    s.close()
                    fresh = socket.create_connection((host, int(port)), timeout=10)
                    fresh.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
                    trickling.append(fresh)

    threading.Thread(target=trickle, daemon=True).start()
    latencies, failures = [], []
    lock = threading.Lock()

    def client(k: int):
        scorer = RemoteScorer(args.reward, url, timeout=600)
        for j in range(args.requests):
            images = [text_image(f"Hello {k} {j} {i}") for i in range(args.images)]
            start = time.perf_counter()
            try:
                scorer._score(images, ['a sign saying "Hello"'] * args.images, [{}] * args.images)
                with lock:
                    latencies.append(time.perf_counter() - start)
            except Exception as err:  # noqa: BLE001 - every failure is counted and reported
                with lock:
                    failures.append(f"{type(err).__name__}: {err}")

    began = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - began
        rss = peak_rss_mb(proc.pid)
    finally:
        stop.set()
        for s in held + trickling:
            s.close()
        proc.terminate()
        proc.wait(30)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
        "reward": args.reward, "clients": args.clients, "requests_per_client": args.requests,
        "images_per_request": args.images, "idle_sockets": args.idle, "trickling_sockets": args.trickle,
        "answered": len(latencies), "failed": len(failures), "failures": failures[:10], "wall_s": round(wall, 3),
        "latency_s": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99), "max": max(latencies, default=float("nan"))},
        "server_peak_rss_mb": rss, "latencies_s": sorted(latencies),
    }
    lat = result["latency_s"]
    print(f"{args.reward}: {len(latencies)} answered, {len(failures)} failed of {args.clients * args.requests}; "
          f"latency p50 {lat['p50']:.2f} s, p99 {lat['p99']:.2f} s, max {lat['max']:.2f} s; wall {wall:.1f} s; "
          f"server peak RSS {rss:.0f} MB")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
