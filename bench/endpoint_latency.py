"""The sampling endpoint against the in-process sampler it wraps: latency p50/p99 and throughput at each
``--concurrency`` (default 1, 8 and 32; each client asks for ``--n`` images at a time, default 1), for the paper
DCGAN (256 px by default) registered and exported to ONNX, or with ``--torch`` saved as a folder and sampled by
torch (the path of every family without an ONNX export, whose concurrent requests the server draws together:
``serving.batching.DrawBatcher``; no tracking server is needed, as on a GPU machine with torch alone).

    python bench/endpoint_latency.py [--requests 64] [--n 1] [--image-size 256] [--torch] [--concurrency 1,8,32]
        [--max-batch 16] [--precision fp32]

Baselines from the same run: in-process latency of one image (the same ONNX Runtime sampler, no HTTP, in a
process of its own) and in-process throughput at the server's batch size, before and after. The server runs as
`sonogen serve` in its own process on loopback; the clients share the machine with it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

NAME = "bench-dcgan"


def register_random_generator(root: Path, image_size: int) -> str:
    import mlflow
    import torch

    from sonogen.export import export_registered
    from sonogen.generators.dcgan import DCGAN, DCGANConfig
    from sonogen.registry import register_generator

    torch.manual_seed(0)
    folder = DCGAN(DCGANConfig(label="consolidation", image_size=image_size)).save(root / "generator")
    run_id = mlflow.MlflowClient().create_run(mlflow.set_experiment("bench-endpoint").experiment_id).info.run_id
    version = register_generator(run_id, folder, NAME, {"family": "dcgan", "label": "consolidation"})
    export_registered(f"models:/{NAME}/{version}")
    return version


def in_process(uri: str, batch: int, precision: str | None) -> tuple[float, float, str]:
    """p50 seconds of one image and images/s at the server's batch of the sampler the server wraps, measured in
    a process of its own that, like the server and unlike this one, has not loaded torch for the export."""
    script = f"""
import json, time
import numpy as np
from sonogen.backends import load_backend
backend = load_backend({uri!r}, {precision!r})
backend.images({batch}, 0)
single = []
for seed in range(20):
    start = time.perf_counter()
    backend.images(1, seed)
    single.append(time.perf_counter() - start)
start = time.perf_counter()
for seed in range(4):
    backend.images({batch}, seed)
print(json.dumps([float(np.median(single)), 4 * {batch} / (time.perf_counter() - start), backend.runtime]))
"""
    return tuple(json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                                           text=True).stdout.splitlines()[-1]))


def percentiles(latencies: list[float]) -> tuple[float, float]:
    return float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--n", type=int, default=1, help="images per request")
    parser.add_argument("--image-size", type=int, default=256,
                        help="32 leaves the network almost free, which isolates the endpoint's own overhead")
    parser.add_argument("--torch", action="store_true", help="sample a saved folder with torch: no ONNX export")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    parser.add_argument("--max-batch", type=int, default=16, help="the server's batch (and the in-process one's)")
    parser.add_argument("--precision", help="torch: what the server samples at (fp32 or bf16)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sonogen-endpoint-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.chdir(root)
    if args.torch:
        import torch

        from sonogen.generators.dcgan import DCGAN, DCGANConfig

        torch.manual_seed(0)
        uri = str(DCGAN(DCGANConfig(label="consolidation", image_size=args.image_size)).save(root / NAME))
        serve = ["--model", uri]
    else:
        version = register_random_generator(root, args.image_size)
        uri, serve = f"models:/{NAME}/{version}", ["--model", NAME, "--version", version]
    p50_single, rate_before, runtime = in_process(uri, args.max_batch, args.precision)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "sonogen.cli", "serve", *serve, "--port", str(port),
                               "--max-batch", str(args.max_batch),
                               *(["--precision", args.precision] if args.precision else [])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = f"/v1/models/{NAME}:predict"
    try:
        for _ in range(600):
            try:
                if requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        # each client thread keeps one http.client connection: a requests.Session adds ~2.5 ms to every call
        # here (p50 4.2 ms against 1.7 ms for the same 32 px request), which is the caller's cost, not the
        # endpoint's, and on 2 shared cores its CPU is taken from the server
        connections: dict[int, http.client.HTTPConnection] = {}

        def call(seed: int) -> float:
            connection = connections.setdefault(threading.get_ident(),
                                                http.client.HTTPConnection("127.0.0.1", port, timeout=120))
            body = json.dumps({"instances": [{"n": args.n, "seed": seed}]})
            start = time.perf_counter()
            connection.request("POST", path, body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"{path}: HTTP {response.status}")
            return time.perf_counter() - start

        call(0)
        rows = []
        for concurrency in map(int, args.concurrency.split(",")):
            with ThreadPoolExecutor(concurrency) as pool:
                start = time.perf_counter()
                latencies = list(pool.map(call, range(1000, 1000 + args.requests)))
                wall = time.perf_counter() - start
            rows.append((concurrency, *percentiles(latencies), args.requests * args.n / wall))
        # the shared machine's speed drifts within minutes: the baseline is taken before and after the endpoint
        # runs, while the server idles, and the ratios use their mean
        rate_after = in_process(uri, args.max_batch, args.precision)[1]
        baseline = (rate_before + rate_after) / 2
        print(f"in-process ({runtime}): one image p50 {p50_single * 1e3:.1f} ms; "
              f"batch {args.max_batch}: {rate_before:.2f} images/s before, {rate_after:.2f} after")
        print("| concurrency | requests | p50 ms | p99 ms | images/s | × in-process batch throughput |")
        print("|---|---|---|---|---|---|")
        for concurrency, p50, p99, rate in rows:
            print(f"| {concurrency} | {args.requests} | {p50 * 1e3:.1f} | {p99 * 1e3:.1f} | {rate:.2f} | "
                  f"{rate / baseline:.2f} |")
        if args.n == 1 and rows[0][0] == 1:
            overhead = rows[0][1] - p50_single
            print(f"p50 overhead of the endpoint at concurrency 1: {overhead * 1e3:.1f} ms "
                  f"(HTTP, JSON, PNG + base64 of one {args.image_size} px image)")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
