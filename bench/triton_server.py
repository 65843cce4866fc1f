"""Local Triton (python-variant repository on the bundled tritonserver) vs ONNX Runtime in-process.
(Named triton_server.py, not triton.py: a script named triton.py in bench/ shadows the `triton` package that torch imports.)

Measures: tritonserver start → ready, batch-1 request latency over loopback through tritonclient HTTP and gRPC
(persistent clients), in-process ONNX Runtime batch-1 latency on the same model, and batch-32 throughput.
Run: .venv/bin/python bench/triton_server.py [--requests 500] [--size 64]. Writes bench/results/triton_server.json.
"""
import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from cvops.triton import TritonServer, build_repository, ensure_triton_env

CLASSES = ["circle", "square", "star", "triangle"]


def make_bundle(folder: Path, size: int) -> Path:
    "A small randomly initialised CNN (demo-sized) exported by cvops.export."
    import torch
    from torch import nn

    from cvops.export import export_bundle
    from cvops.preprocess import PreprocessSpec
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(64, len(CLASSES))).eval()
    x = np.random.default_rng(0).normal(size=(8, 3, size, size)).astype(np.float32)
    return export_bundle(model, CLASSES, PreprocessSpec(size=size), folder, x, name="bench")[0]


def timed(fn, n: int, warmup: int = 30) -> list[float]:
    for _ in range(warmup): fn()
    out = []
    for _ in range(n):
        t = time.perf_counter(); fn(); out.append((time.perf_counter() - t) * 1e3)
    return out


def summary(ms: list[float]) -> dict:
    q = np.percentile(ms, [50, 99])
    return {"p50_ms": round(float(q[0]), 3), "p99_ms": round(float(q[1]), 3), "mean_ms": round(statistics.fmean(ms), 3), "n": len(ms)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--starts", type=int, default=3, help="server starts to time")
    ap.add_argument("--ort-threads", type=int, default=0, help="ONNX Runtime intra-op threads in Triton's model.py (0: its default)")
    args = ap.parse_args()

    import onnxruntime as ort
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    t0 = time.monotonic()
    env = ensure_triton_env()
    env_seconds = time.monotonic() - t0
    work = Path(tempfile.mkdtemp(prefix="cvops-bench-triton-"))
    bundle = make_bundle(work / "bundle", args.size)
    build_repository(bundle, work / "repo", "bench", batching={"max_batch_size": 32, "preferred_batch_sizes": [8, 16, 32],
                                                               "max_queue_delay_us": 100},
                     ort_threads=args.ort_threads)
    x1 = np.random.default_rng(1).normal(size=(1, 3, args.size, args.size)).astype(np.float32)
    x32 = np.random.default_rng(2).normal(size=(32, 3, args.size, args.size)).astype(np.float32)
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    inproc = summary(timed(lambda: sess.run(["logits"], {"input": x1}), args.requests))
    inproc32 = summary(timed(lambda: sess.run(["logits"], {"input": x32}), max(20, args.requests // 10)))

    starts, stops = [], []
    for _ in range(args.starts):
        srv = TritonServer(work / "repo", env=env, log_file=work / "start.log").start()
        starts.append(srv.startup_seconds)
        t = time.monotonic(); srv.stop(); stops.append(time.monotonic() - t)
    results = {}
    with TritonServer(work / "repo", env=env, log_file=work / "triton.log") as srv:
        for proto, mod, url in (("http", httpclient, srv.http_url), ("grpc", grpcclient, srv.grpc_url)):
            client = mod.InferenceServerClient(url)
            try:
                def call(x):
                    inp = mod.InferInput("input", list(x.shape), "FP32"); inp.set_data_from_numpy(x)
                    return client.infer("bench", [inp], outputs=[mod.InferRequestedOutput("logits")]).as_numpy("logits")
                np.testing.assert_allclose(call(x1), sess.run(["logits"], {"input": x1})[0], atol=1e-5)  # values, not just a status
                b1 = summary(timed(lambda: call(x1), args.requests))
                b32 = summary(timed(lambda: call(x32), max(20, args.requests // 10)))
            finally:
                client.close()
            results[proto] = {"batch1": b1, "batch32": b32, "batch32_images_per_s": round(32e3 / b32["p50_ms"], 1),
                              "overhead_p50_ms": round(b1["p50_ms"] - inproc["p50_ms"], 3)}

    report = {"machine": platform.node(), "size": args.size, "ort_threads": args.ort_threads, "env_ready_seconds": round(env_seconds, 2),
              "startup_seconds": [round(s, 2) for s in starts], "startup_median_s": round(statistics.median(starts), 2),
              "stop_seconds": [round(s, 2) for s in stops],
              "inprocess_onnxruntime": {"batch1": inproc, "batch32": inproc32,
                                        "batch32_images_per_s": round(32e3 / inproc32["p50_ms"], 1)}, **results}
    print(f"tritonserver start → ready: median {report['startup_median_s']:.2f} s over {len(starts)} starts "
          f"(SPEC §8 reference: ≈2 s); stop (SIGTERM → exit) median {statistics.median(stops):.2f} s")
    print(f"{'path':<26}{'b1 p50 ms':>10}{'b1 p99 ms':>10}{'b32 img/s':>11}{'overhead p50':>14}  reference")
    print(f"{'ONNX Runtime in-process':<26}{inproc['p50_ms']:>10.3f}{inproc['p99_ms']:>10.3f}"
          f"{report['inprocess_onnxruntime']['batch32_images_per_s']:>11.0f}{'':>14}")
    for proto in ("http", "grpc"):
        r = results[proto]
        print(f"{'Triton ' + proto + ' (loopback)':<26}{r['batch1']['p50_ms']:>10.3f}{r['batch1']['p99_ms']:>10.3f}"
              f"{r['batch32_images_per_s']:>11.0f}{r['overhead_p50_ms']:>+13.3f}  SPEC §8: a call ≈0.7 ms")
    out = Path(__file__).parent / "results" / "triton_server.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
