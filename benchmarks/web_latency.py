"""Web API latency: single 696 x 520 TIFF requests against a running `celltally serve`.

    python benchmarks/web_latency.py [--requests 40] [--model bbbc005] [--concurrency 1]

Starts `celltally serve` as a subprocess on a free loopback port (the shipped
model if present, else --model is required), then sends N requests of one
simulated 696 x 520 8-bit TIFF each to POST /api/count from a client on the
same machine, with saliency maps on and off. Each mode is bounded by
--requests and --max-seconds. Prints requests/s and latency (median, p95, max)
and writes benchmarks/results/web_latency.json with the machine described.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile
from provenance import stamp

from celltally.counter import available_models, resolve_model
from celltally.simulate import simulate_scene

BOUNDARY = "celltally-bench-boundary"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def multipart(name: str, data: bytes, saliency: bool) -> bytes:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        "Content-Type: image/tiff\r\n\r\n"
    ).encode()
    flag = (
        f'\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name="saliency"\r\n\r\n'
        f"{'true' if saliency else 'false'}\r\n--{BOUNDARY}--\r\n"
    ).encode()
    return head + data + flag


def post(url: str, body: bytes) -> tuple[float, dict, int]:
    request = urllib.request.Request(
        f"{url}/api/count",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        raw = response.read()
    elapsed = time.perf_counter() - start
    payload = json.loads(raw)
    if payload.get("counted") != 1:
        raise RuntimeError(f"request failed: {payload}")
    return elapsed, payload, len(raw)


def start_server(model: str, port: int, log: Path, threads: int | None) -> subprocess.Popen:
    command = [sys.executable, "-m", "celltally.cli", "serve", "--port", str(port)]
    command += ["--model", model]
    if threads is not None:
        command += ["--threads", str(threads)]
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"celltally serve exited:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=2):
                return process
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit(f"celltally serve did not start in 120 s:\n{log.read_text()}")


def run_mode(url, bodies, saliency, requests, concurrency, max_seconds) -> dict:
    encoded = [multipart(name, data, saliency) for name, data in bodies]
    for body in encoded[:2]:
        post(url, body)  # warm-up (not timed)
    latencies: list[float] = []
    server_seconds: list[float] = []
    sizes: list[int] = []
    start = time.perf_counter()

    def one(i: int):
        if time.perf_counter() - start > max_seconds:
            return None
        return post(url, encoded[i % len(encoded)])

    with ThreadPoolExecutor(concurrency) as pool:
        for outcome in pool.map(one, range(requests)):
            if outcome is None:
                continue
            elapsed, payload, size = outcome
            latencies.append(elapsed)
            server_seconds.append(payload["results"][0]["seconds"])
            sizes.append(size)
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, int(np.ceil(0.95 * len(ordered))) - 1)]
    return {
        "saliency": saliency,
        "requests": len(latencies),
        "concurrency": concurrency,
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 3),
        "latency_median_ms": round(1000 * statistics.median(latencies), 1),
        "latency_p95_ms": round(1000 * p95, 1),
        "latency_max_ms": round(1000 * ordered[-1], 1),
        "server_median_ms": round(1000 * statistics.median(server_seconds), 1),
        "response_kb_median": round(statistics.median(sizes) / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40, help="per mode")
    parser.add_argument("--model", default=None, help="default: the shipped bbbc005 model")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="server's PyTorch threads")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="per mode")
    parser.add_argument("--out", default="benchmarks/results/web_latency.json")
    args = parser.parse_args()
    model = args.model or ("bbbc005" if "bbbc005" in available_models() else None)
    if model is None:
        parser.error("no shipped bbbc005 model yet: pass --model <model folder>")
    model_dir = resolve_model(model)
    bodies = []
    for seed in range(6):
        buffer = io.BytesIO()
        image = simulate_scene(10 + 15 * seed, size=(520, 696), seed=seed).image
        tifffile.imwrite(buffer, image)
        bodies.append(
            (f"SIMCEPImages_A{seed + 1:02d}_C{10 + 15 * seed}_F1_s01_w1.TIF", buffer.getvalue())
        )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        process = start_server(str(model_dir), port, Path(tmp) / "server.log", args.threads)
        try:
            rows = [
                run_mode(url, bodies, flag, args.requests, args.concurrency, args.max_seconds)
                for flag in (False, True)
            ]
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
    header = (
        f"{'saliency':<9} {'n':>4} {'req/s':>7} {'median ms':>10} {'p95 ms':>8} "
        f"{'max ms':>8} {'server ms':>10} {'resp KB':>8}"
    )
    print(
        f"model {model_dir.name}, 696x520 8-bit TIFF, one per request, "
        f"concurrency {args.concurrency}, server threads {args.threads or 'default'}, loopback"
    )
    print(header)
    for r in rows:
        print(
            f"{'on' if r['saliency'] else 'off':<9} {r['requests']:>4} {r['requests_per_s']:>7.2f} "
            f"{r['latency_median_ms']:>10.1f} {r['latency_p95_ms']:>8.1f} "
            f"{r['latency_max_ms']:>8.1f} {r['server_median_ms']:>10.1f} "
            f"{r['response_kb_median']:>8.1f}"
        )
    report = {
        "benchmark": "web_latency",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "model": model_dir.name,
        "server_threads": args.threads,
        "concurrency": args.concurrency,
        "image": "696x520 uint8 TIFF (simulated), one file per request",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        },
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stamp(report), indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
