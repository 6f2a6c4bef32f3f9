"""Load test of `mit serve` on this machine: requests per second and latency of a segmentation adapter.

    python benchmarks/serve_load.py --config configs/demo.yaml --ckpt_path best     # starts `mit serve` itself
    python benchmarks/serve_load.py --url http://127.0.0.1:8000/                    # a server already running

Sends `--requests` segmentation requests (a demo-like image of coloured shapes and one expression
naming one of them) from `--concurrency` clients, to this machine only, and stops after
`--max_seconds` whatever happens. Prints one JSON line: requests/s, p50/p95/max latency, errors,
and the server's batches over the run (from GET /stats). A started server is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import statistics
import subprocess
import sys
import time
from typing import Sequence
from urllib.parse import urlparse

import httpx
import numpy as np

from mit_lightning.data.synthetic import place_objects, render

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def demo_requests(count: int, size: int = 64, seed: int = 0) -> list[tuple[bytes, str]]:
    """(PNG bytes, expression) pairs: images like the demo's, each expression naming one of its shapes."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        objects = place_objects(int(rng.integers(2, 5)), size, rng)
        target = objects[int(rng.integers(len(objects)))]
        buffer = io.BytesIO()
        render(objects, size, rng).save(buffer, format="PNG")
        pairs.append((buffer.getvalue(), f"the {target['colour']} {target['shape']}"))
    return pairs


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(options: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "mit_lightning", "serve", "--port", str(port), "--device", options.device,
               "--max_batch_size", str(options.max_batch_size), "--max_wait_ms", str(options.max_wait_ms)]
    command += [arg for path in options.ckpt_path for arg in ("--ckpt_path", path)]
    command += [arg for config in options.config for arg in ("--config", config)]
    command += ["--compile", options.compile] if options.compile else []
    return subprocess.Popen(command), f"http://127.0.0.1:{port}/"


def wait_until_up(url: str, server: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise SystemExit(f"mit serve exited with status {server.returncode} before answering.")
        try:
            if httpx.get(url + "adapters", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s.")


async def load(url: str, adapter: str, pairs: list[tuple[bytes, str]], options: argparse.Namespace) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    stop_at = time.monotonic() + options.max_seconds
    next_request = iter(range(options.requests))

    async def client_loop(client: httpx.AsyncClient) -> None:
        for number in next_request:
            if time.monotonic() > stop_at:
                return
            image, expression = pairs[number % len(pairs)]
            started = time.perf_counter()
            try:
                response = await client.post(f"{url}adapters/{adapter}/segment", files={"image": image},
                                             data={"expression": expression})
                outcome = None if response.status_code == 200 else f"HTTP {response.status_code}"
            except httpx.HTTPError as error:
                outcome = type(error).__name__
            if outcome is None:
                latencies.append(time.perf_counter() - started)
            else:
                errors[outcome] = errors.get(outcome, 0) + 1

    timeout = httpx.Timeout(options.max_seconds)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=options.concurrency)) as client:
        before = (await client.get(url + "stats")).json()
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(options.concurrency)))
        elapsed = time.perf_counter() - started
        after = (await client.get(url + "stats")).json()
    batches, samples = after["batches"] - before["batches"], after["samples"] - before["samples"]
    milliseconds = sorted(1000 * latency for latency in latencies)
    return {
        "adapter": adapter,
        "requests": len(latencies) + sum(errors.values()),
        "ok": len(latencies),
        "errors": errors,
        "concurrency": options.concurrency,
        "seconds": round(elapsed, 2),
        "requests_per_s": round(len(latencies) / elapsed, 2),
        "p50_ms": round(statistics.median(milliseconds), 1) if milliseconds else None,
        "p95_ms": round(milliseconds[min(len(milliseconds) - 1, int(0.95 * len(milliseconds)))], 1) if milliseconds else None,
        "max_ms": round(milliseconds[-1], 1) if milliseconds else None,
        "server_max_batch_size": after["max_batch_size"],
        "server_max_wait_ms": after["max_wait_ms"],
        "batches": batches,
        "mean_batch_size": round(samples / batches, 2) if batches else None,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server on this machine (default: start `mit serve` here)")
    parser.add_argument("--ckpt_path", action="append", default=[], help="for the started server (as mit serve)")
    parser.add_argument("--config", action="append", default=[], help="for the started server (as mit serve)")
    parser.add_argument("--adapter", help="the segmentation adapter to load (default: the first one)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max_seconds", type=float, default=120.0, help="stop sending after this long")
    parser.add_argument("--max_batch_size", type=int, default=8, help="for the started server")
    parser.add_argument("--max_wait_ms", type=float, default=10.0, help="for the started server")
    parser.add_argument("--device", default="cpu", help="for the started server")
    parser.add_argument("--compile", default=None, help="for the started server (as mit serve: default, reduce-overhead, ...)")
    parser.add_argument("--warmup", type=int, default=8, help="untimed requests first")
    options = parser.parse_args(argv)
    server = None
    if options.url:
        url = options.url.rstrip("/") + "/"
        if urlparse(url).hostname not in LOCAL_HOSTS:
            raise SystemExit(f"Load tests only go to this machine ({', '.join(LOCAL_HOSTS)}), not {url}.")
    else:
        if not options.ckpt_path:
            raise SystemExit("Give --url of a running server, or --ckpt_path (and --config) to start one.")
        server, url = start_server(options)
    try:
        wait_until_up(url, server, timeout=600)
        listed = httpx.get(url + "adapters").json()["adapters"]
        adapter = options.adapter or next(item["name"] for item in listed if item["task"] == "segmentation")
        pairs = demo_requests(64)
        warmup = argparse.Namespace(**{**vars(options), "requests": options.warmup})
        asyncio.run(load(url, adapter, pairs, warmup))
        print(json.dumps(asyncio.run(load(url, adapter, pairs, options))))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
