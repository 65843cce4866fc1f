"""Benchmark of the prediction gateway (SPEC §7), all figures from one run, printed beside the targets and written
to bench/results/serve.json:

- in-process ONNX Runtime on preprocessed tensors (batch 1 and batch 32), and in-process decode + preprocess + infer
  of the same JPEGs (the baseline the gateway is compared with);
- the gateway (`cvops serve`, uvicorn + uvloop + httptools, a real process) at concurrency 1 (p50/p99) and at
  concurrency 16 (throughput), with and without micro-batching;
- the gateway over a local Triton (the bundled tritonserver, Python backend, via cvops.triton), HTTP and gRPC;
- the gateway's resident memory with the model loaded.

Clients are minimal HTTP/1.1 on keep-alive connections with pre-built requests (a blocking socket at concurrency 1,
asyncio + uvloop at 16) in this process; each gateway runs in its own. All share the machine's cores, as a client
beside a server would, and all paths are measured in interleaved rounds so that load from other processes (this
machine is shared) falls on each of them alike.

- against peers, all driven by the same compiled load generators (`hey`, and `wrk` for the side-by-side latency at one
  client, whose 10 µs steps resolve what hey's 0.1 ms steps do not; both started by the bench): a naive FastAPI +
  ONNX Runtime app and LitServe 0.2.19 in its batched config (max_batch 8, 10 ms, fast_queue; JSON base64 body, as
  LitServe takes it) serving the same ONNX model, and the cvops gateway, on a 64 px JPEG at 1, 16 and 64 clients and
  a 12 MP phone-size JPEG (4032 × 3024, generated) at 1 and 4; gateway → Triton against a direct tritonclient call to
  the same Triton; and reduced-scale JPEG decoding against full decoding on held-out large photos (top-1 agreement,
  printed).

    .venv/bin/python bench/serve.py [--backbone mobilenet_v3_small] [--size 64] [--rounds 6] [--block 100] [--only-peers] [--only-detection]

The machine may be shared with other work: figures are as measured, under whatever load there was (printed).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from serve_helpers import (Gateway, draft_agreement, encode, free_port, large_photos, make_bundle, make_images,  # noqa: E402
                           train_photo_classifier)

TARGETS = {"overhead_ms": 1.0, "throughput_ratio": 1.3, "triton_ratio": 1.5, "rss_mb": 250.0,
           # issue 14, against peers
           "big_vs_naive": 3.0, "big_c1_p50_ms": 40.0, "small_c16_vs_litserve": 1.3, "small_c16_vs_naive": 1.2,
           "triton_minus_direct_ms": 0.5, "draft_agreement": 0.995}


def pct(xs, q): return float(np.percentile(np.asarray(xs) * 1000, q))


def cpu_seconds(pid: int) -> float:
    "User + system CPU time of a process (all its threads), from /proc: contention does not inflate it."
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


# -- in-process ---------------------------------------------------------------

class InProcess:
    "The gateway's work without HTTP: decode, preprocess, ONNX Runtime (same session options), softmax, top-k."
    def __init__(self, bundle: Path):
        from cvops.bundle import ModelBundle, ort_session
        from PIL import Image
        self.b = b = ModelBundle.load(bundle)
        self.sess = ort_session(b.onnx_path)
        self.S, self.rs = b.spec.size, Image.Resampling[b.spec.resample.upper()]

    def run(self, x): return self.sess.run(["logits"], {"input": x})[0]

    def full(self, d: bytes):
        from cvops.preprocess import load_image, softmax, to_input
        from cvops.serve_http import FORMATS
        img = load_image(d, 16_000_000, FORMATS)
        small = img if img.size == (self.S, self.S) else img.resize((self.S, self.S), self.rs)
        p = softmax(self.run(to_input(small, self.b.spec)[None]))
        return [(self.b.classes[j], float(p[0, j])) for j in np.argsort(-p[0])[:3]]


def tensor_figures(ip: InProcess, jpegs, n: int) -> dict:
    from cvops.preprocess import load_image, to_input
    xs = np.stack([to_input(load_image(d), ip.b.spec) for d in jpegs])
    out = {}
    for bs in (1, 8, 16, 32):
        x = np.concatenate([xs] * (bs // len(xs) + 1))[:bs]
        for _ in range(5): ip.run(x)
        lat = []
        for i in range(max(20, n // bs)):
            t0 = time.perf_counter(); ip.run(x); lat.append(time.perf_counter() - t0)
        out[f"b{bs}"] = {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "img_s": bs / float(np.median(lat))}
    return out


# -- HTTP clients ----------------------------------------------------------------

def requests_for(jpegs, path="/v1/predict"):
    return [(f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: image/jpeg\r\nContent-Length: {len(d)}\r\n\r\n").encode() + d
            for d in jpegs]


class SyncClient:
    "One keep-alive connection, blocking sockets: the least client overhead for concurrency 1."
    def __init__(self, port):
        self.port = port
        self.connect()

    def connect(self):
        import socket
        self.sock = socket.create_connection(("127.0.0.1", self.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk: raise ConnectionResetError("the gateway closed the connection")
        return chunk

    def call(self, req: bytes) -> bytes:
        try:
            self.sock.sendall(req)
            while b"\r\n\r\n" not in self.buf: self.buf += self._recv()
        except (ConnectionResetError, BrokenPipeError):  # an idle keep-alive connection timed out: reconnect once
            self.sock.close(); self.connect()
            self.sock.sendall(req)
            while b"\r\n\r\n" not in self.buf: self.buf += self._recv()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        cl = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(rest) < cl: rest += self._recv()
        body, self.buf = rest[:cl], rest[cl:]
        if head[9:12] != b"200": raise RuntimeError(f"gateway answered {head[:12]!r}: {body[:300]!r}")
        return body

    def close(self): self.sock.close()


async def _connection(port, reqs, n, offset, lat):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i in range(n):
            t0 = time.perf_counter()
            writer.write(reqs[(offset + i) % len(reqs)])
            head = await reader.readuntil(b"\r\n\r\n")
            cl = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            body = await reader.readexactly(cl)
            lat.append(time.perf_counter() - t0)
            if head[9:12] != b"200": raise RuntimeError(f"gateway answered {head[:12]!r}: {body[:300]!r}")
    finally:
        writer.close()


def concurrent_block(port: int, reqs: list[bytes], concurrency: int, total: int) -> tuple[float, list]:
    "`total` requests over `concurrency` keep-alive connections: (wall seconds, latencies)."
    import uvloop
    async def main():
        lat, per = [], total // concurrency
        t0 = time.perf_counter()
        await asyncio.gather(*(_connection(port, reqs, per, k * 7, lat) for k in range(concurrency)))
        return time.perf_counter() - t0, lat
    return uvloop.run(main())


# -- peers, driven by hey ---------------------------------------------------------------

NAIVE_APP = """
import io, json, sys
import numpy as np, onnxruntime as ort
from fastapi import FastAPI, Request
from PIL import Image
B = __import__('os').environ['BUNDLE']
spec = json.load(open(B + '/preprocess.json')); S = spec['size']
MEAN, STD = np.array(spec['mean'], np.float32), np.array(spec['std'], np.float32)
CLASSES = open(B + '/labels.txt').read().split()
sess = ort.InferenceSession(B + '/model.onnx', providers=['CPUExecutionProvider'])
app = FastAPI()
@app.post('/predict')
async def predict(request: Request):
    img = Image.open(io.BytesIO(await request.body())).convert('RGB').resize((S, S), Image.BILINEAR)
    x = ((np.asarray(img, np.float32) / 255 - MEAN) / STD).transpose(2, 0, 1)[None]
    z = sess.run(None, {'input': x})[0][0]; p = np.exp(z - z.max()); p /= p.sum()
    return {'label': CLASSES[int(p.argmax())], 'score': float(p.max())}
@app.get('/health')
async def health(): return {'ok': True}
"""

LITSERVE_APP = """
import base64, io, json, os, sys
import numpy as np, onnxruntime as ort, litserve as ls
from PIL import Image
B, PORT = os.environ['BUNDLE'], int(os.environ['PORT'])
class API(ls.LitAPI):
    def setup(self, device):
        spec = json.load(open(B + '/preprocess.json')); self.S = spec['size']
        self.mean, self.std = np.array(spec['mean'], np.float32), np.array(spec['std'], np.float32)
        self.classes = open(B + '/labels.txt').read().split()
        self.sess = ort.InferenceSession(B + '/model.onnx', providers=['CPUExecutionProvider'])
    def decode_request(self, request):
        img = Image.open(io.BytesIO(base64.b64decode(request['image']))).convert('RGB').resize((self.S, self.S), Image.BILINEAR)
        return ((np.asarray(img, np.float32) / 255 - self.mean) / self.std).transpose(2, 0, 1)
    def batch(self, xs): return np.stack(xs)
    def predict(self, x): return self.sess.run(None, {'input': x})[0]
    def unbatch(self, z): return list(z)
    def encode_response(self, z):
        p = np.exp(z - z.max()); p /= p.sum()
        return {'label': self.classes[int(p.argmax())], 'score': float(p.max())}
if __name__ == '__main__':
    ls.LitServer(API(max_batch_size=8, batch_timeout=0.01), accelerator='cpu', fast_queue=True).run(port=PORT, log_level='warning', generate_client_file=False)
"""


class Server:
    "A peer server process on a free loopback port, up when `health` answers 200 (from each of `workers`); stopped by PID."
    def __init__(self, cmd, health, env=None, log=None, workers=1):
        import subprocess
        self.port = free_port()
        self.cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(self.cmd, env={**os.environ, **(env or {}), "PORT": str(self.port)}, start_new_session=True,
                                     stdout=open(log, "w") if log else subprocess.DEVNULL, stderr=subprocess.STDOUT)
        import httpx
        for _ in range(600):
            if self.proc.poll() is not None: raise RuntimeError(f"{cmd[:3]} exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + health, timeout=0.5).status_code == 200 and len(self.pids()) >= workers:
                    if workers > 1: time.sleep(3)  # a worker counted may still be loading its model
                    return
            except httpx.TransportError: pass
            time.sleep(0.1)
        raise RuntimeError(f"{cmd[:3]} not up after 60 s")

    def pids(self) -> list[int]:
        "The serving processes: the server itself, or its worker children (multiprocessing's resource tracker left out)."
        import psutil
        kids = [p for p in psutil.Process(self.proc.pid).children() if "resource_tracker" not in " ".join(p.cmdline())]
        return [p.pid for p in kids] or [self.proc.pid]

    def rss_mb(self) -> list[float]:
        return [int(Path(f"/proc/{p}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024 for p in self.pids()]

    def stop(self):
        import signal
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try: self.proc.wait(15)
            except Exception: os.killpg(self.proc.pid, signal.SIGKILL)


def hey(url: str, body: Path, ctype: str, n: int, c: int, seconds: float = 0) -> dict:
    "Run hey (Debian's Go load generator) for `n` requests, or for `seconds` when given: requests/s, p50/p99 ms, and any non-200 answers."
    import subprocess
    amount = ["-z", f"{seconds:g}s"] if seconds else ["-n", str(n)]
    out = subprocess.run(["/usr/bin/hey", *amount, "-c", str(c), "-m", "POST", "-T", ctype, "-D", str(body), "-disable-compression", url],
                         capture_output=True, text=True, timeout=600).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    q = {int(m.group(1)): float(m.group(2)) * 1000 for m in re.finditer(r"(\d+)%+ in ([\d.]+) secs", out)}
    codes = {m.group(1): int(m.group(2)) for m in re.finditer(r"\[(\d+)\]\s+(\d+) responses", out)}
    return {"req_s": rps, "p50_ms": q.get(50), "p99_ms": q.get(99), "codes": codes}


def wrk_c1(url: str, body: Path, ctype: str, seconds: float) -> dict:
    "Run wrk (Debian's C load generator) on one connection for `seconds`, POSTing `body`: p50 ms in wrk's 10 µs steps, requests/s, failures."
    import subprocess
    script = body.with_suffix(".lua")  # wrk takes a request body only from a Lua script
    script.write_text(f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "{ctype}"\n'
                      f'local f = io.open("{body}", "rb")\nwrk.body = f:read("*a")\nf:close()\n')
    out = subprocess.run(["/usr/bin/wrk", "-t1", "-c1", f"-d{seconds:g}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    m = re.search(r"50%\s+([\d.]+)(us|ms|s)\b", out)
    if m is None: raise RuntimeError(f"wrk printed no latency distribution:\n{out}")
    p50 = float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"p50_ms": p50, "req_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "non_2xx": int(bad.group(1)) if bad else 0, "socket_errors": sum(map(int, errors.groups())) if errors else 0}


def median_ci95(xs) -> tuple[float, list[float]]:
    "The median of `xs` and a bootstrap 95 % interval of it (seeded: the same figures give the same interval)."
    from scipy.stats import bootstrap
    xs = np.asarray(xs, float)
    ci = bootstrap((xs,), np.median, confidence_level=0.95, n_resamples=2000, random_state=0).confidence_interval
    return float(np.median(xs)), [float(ci.low), float(ci.high)]


def _median_run(runs: list[dict]) -> dict:
    "Per figure, the median over the runs (req/s and p50 each on their own), with every run kept."
    out = {}
    for k in runs[0]:
        if k == "rss_mb": out[k] = statistics.median(r[k] for r in runs); continue
        vals = {f: [r[k][f] for r in runs if r[k][f] is not None] for f in ("req_s", "p50_ms", "p99_ms")}  # hey omits p99 of few requests
        out[k] = {f: statistics.median(v) if v else None for f, v in vals.items()}
        out[k]["codes"] = {c: sum(r[k]["codes"].get(c, 0) for r in runs) for r in runs for c in r[k]["codes"]}
        out[k]["runs_req_s"] = [r[k]["req_s"] for r in runs]
    return out


def peer_figures(bundle: Path, tmp: Path, small_n: int, big_n: int, runs: int = 3, small_s: float = 0) -> dict:
    "Every server on both payloads, one after the other (each alone on the machine while measured), `runs` rounds: medians."
    import base64
    from PIL import Image
    small = encode(Image.open(next((tmp / "images").rglob("*.png"))).convert("RGB"), "JPEG", quality=90)
    big = large_photos(1, size=(4032, 3024), seed=5, quality=92)[0]
    files = {}
    for name, data in (("small", small), ("big", big)):
        (tmp / f"{name}.jpg").write_bytes(data)
        (tmp / f"{name}.json").write_text(json.dumps({"image": base64.b64encode(data).decode()}))
        files[name] = {"jpeg": (tmp / f"{name}.jpg", "image/jpeg"), "json": (tmp / f"{name}.json", "application/json")}
    (tmp / "naive_app.py").write_text(NAIVE_APP); (tmp / "lit_app.py").write_text(LITSERVE_APP)
    py, env = sys.executable, {"BUNDLE": str(bundle), "OMP_WAIT_POLICY": "PASSIVE"}
    servers = {
        "naive FastAPI + ORT": (lambda: Server([py, "-m", "uvicorn", "naive_app:app", "--port", "{port}", "--log-level", "warning", "--app-dir", str(tmp)],
                                               "/health", env, tmp / "naive.log"), "/predict", "jpeg"),
        "LitServe batched": (lambda: Server([py, str(tmp / "lit_app.py")], "/health", env, tmp / "lit.log"), "/predict", "json"),
        "cvops gateway": (lambda: Server([str(Path(py).parent / "cvops"), "serve", "--model-dir", str(bundle), "--port", "{port}"],
                                         "/readyz", {"CVOPS_HOME": str(tmp / "home")}, tmp / "cvops.log"), "/v1/predict", "jpeg"),
        # as many workers as cores, sharing the port (cvops.serve_workers); up when every worker is ready
        WORKERS: (lambda: Server([str(Path(py).parent / "cvops"), "serve", "--model-dir", str(bundle), "--port", "{port}",
                                  "--workers", str(os.cpu_count())], "/readyz", {"CVOPS_HOME": str(tmp / "home")}, tmp / "cvops-w.log",
                                 workers=os.cpu_count()), "/v1/predict", "jpeg"),
    }
    out = {"payload_bytes": {"small": len(small), "big": len(big)}, "runs": runs, "servers": {}}
    per = {name: [] for name in servers}
    for run in range(runs):  # rounds of every server in turn: drifting load from other processes falls on each alike
        for name, (start, path, kind) in servers.items():
            try: s = start()
            except RuntimeError as e:
                out["servers"][name] = {"error": str(e)}; print(f"  {name}: {e}", flush=True); continue
            try:
                r = {}
                for payload, n, cs in (("small", small_n, (1, 16, 64)), ("big", big_n, (1, 4))):
                    body, ctype = files[payload][kind]
                    hey(s.url + path, body, ctype, max(20, n // 10), cs[-1])  # warm-up
                    for c in cs:  # the 64 px runs with many clients for `small_s` seconds: 2,000 requests went by in 1 s here
                        r[f"{payload}_c{c}"] = hey(s.url + path, body, ctype, n if c > 1 else max(20, n // 4), c, small_s if payload == "small" and c > 1 else 0)
                if name.startswith("cvops"): r["rss_mb"] = max(s.rss_mb())  # per process: the largest worker
                per[name].append(r)
                print(f"  run {run + 1}/{runs} {name}: " + ", ".join(f"{k} {v['req_s']:.0f} req/s p50 {v['p50_ms']:.1f} ms"
                                                              for k, v in r.items() if isinstance(v, dict)), flush=True)
            finally: s.stop()
    for name, rs in per.items():
        if rs: out["servers"][name] = _median_run(rs)
    # c1 latency of the two side by side: this VM's speed swings by up to 1.5 ms of p50 over minutes, so the servers
    # alone one after the other differ by luck; up at once (an idle server costs nothing) and alternating short runs, they do not
    pair = {k: servers[k] for k in ("naive FastAPI + ORT", "cvops gateway")}
    out["small_c1_interleaved"] = c1_interleaved(pair, files["small"], rounds=8 * runs)
    return out


def c1_interleaved(servers: dict, files: dict, rounds: int, seconds: float = 2.0) -> dict:
    """c1 p50 of servers up at once, measured in alternating wrk runs of `seconds`: per server the median over rounds, and
    the median per-round difference (second − first). wrk, not hey: hey prints latencies in 0.1 ms steps, as large as
    the difference measured; wrk in 10 µs steps."""
    started, p50, failed = {}, {name: [] for name in servers}, 0
    try:
        for name, (start, path, kind) in servers.items(): started[name] = (start(), path, kind)
        for s, path, kind in started.values(): wrk_c1(s.url + path, *files[kind], 1)  # warm-up
        for _ in range(rounds):
            for name, (s, path, kind) in started.items():
                r = wrk_c1(s.url + path, *files[kind], seconds)
                p50[name].append(r["p50_ms"]); failed += r["non_2xx"] + r["socket_errors"]
    finally:
        for s, _, _ in started.values(): s.stop()
    first, second = p50.values()
    diffs = [b - a for a, b in zip(first, second)]
    out = {name: {"p50_ms": statistics.median(v), "rounds_p50_ms": v} for name, v in p50.items()}
    # the two sit on the same floor (ONNX Runtime's 0.2 ms and loopback HTTP), so the sign of a median difference of a few
    # hundredths of a ms is luck unless the interval says otherwise: both are printed
    out["difference_ms"], out["difference_ci95_ms"] = median_ci95(diffs)
    low, high = out["difference_ci95_ms"]
    out["rounds_second_faster"] = sum(d < 0 for d in diffs)
    out["failed_requests"] = failed
    print("  c1 side by side (wrk), p50 ms per round: " + "; ".join(f"{k} {[round(x, 3) for x in v]}" for k, v in p50.items())
          + f"; median difference {out['difference_ms']:.3f} (95 % interval {low:+.3f} to {high:+.3f}; second faster in "
          f"{out['rounds_second_faster']} of {len(diffs)} rounds)" + (f"; {failed} FAILED requests" if failed else ""), flush=True)
    return out


def detection_figures(tmp: Path, n: int, sizes=(64, 128)) -> dict:
    "The gateway with a detector beside the gateway with the classifier, same photo, driven by hey (p50 c1, req/s c16)."
    import torch
    from detection_helpers import draw_scene, train_detector, CLASSES
    from cvops.bundle import ModelBundle, ort_session
    from cvops.export_detection import export_detector
    from cvops.preprocess import preprocess_bytes
    out = {}
    for size in sizes:
        model, spec = train_detector(size=size, steps=4)  # the latency does not depend on how well it detects
        photo = encode(draw_scene(np.random.default_rng(1), size)[0], "JPEG", quality=90)
        (tmp / f"det{size}.jpg").write_bytes(photo)
        x = preprocess_bytes(photo, spec)[None]
        det, _ = export_detector(model, CLASSES, spec, tmp / f"det-bundle-{size}", x, min_score=0.06)
        cls = make_bundle(tmp / f"cls-bundle-{size}", sorted((tmp / "images").rglob("*.png"))[:16], size=size)
        sess = ort_session(ModelBundle.load(det).onnx_path)
        ts = []
        for _ in range(30):
            t0 = time.perf_counter(); sess.run(None, {"input": x}); ts.append(time.perf_counter() - t0)
        row = {"ort_in_process_p50_ms": pct(ts[5:], 50), "torch_threads": torch.get_num_threads()}
        for kind, bundle in (("detection", det), ("classification", cls)):
            with Gateway("--model-dir", bundle, env={"CVOPS_HOME": str(tmp / "home")}, log=tmp / f"{kind}{size}.log") as g:
                url = g.url + "/v1/predict" + ("?score_threshold=0.05" if kind == "detection" else "")
                hey(url, tmp / f"det{size}.jpg", "image/jpeg", 20, 4)  # warm-up
                row[kind] = {"c1": hey(url, tmp / f"det{size}.jpg", "image/jpeg", max(20, n // 4), 1),
                             "c16": hey(url, tmp / f"det{size}.jpg", "image/jpeg", n, 16)}
        out[f"{size}px"] = row
        d, c = row["detection"], row["classification"]
        print(f"  {size} px: detection p50 c1 {d['c1']['p50_ms']:.1f} ms, c16 {d['c16']['req_s']:.1f} req/s | classification p50 c1 "
              f"{c['c1']['p50_ms']:.1f} ms, c16 {c['c16']['req_s']:.1f} req/s | detector in-process ORT p50 {row['ort_in_process_p50_ms']:.1f} ms",
              flush=True)
    return out


def triton_direct_figures(bundle: Path, tmp: Path, jpegs: list[bytes], n: int) -> dict:
    """p50 of a direct tritonclient call to Triton (the client decodes and preprocesses the JPEG, then sends the tensor) and
    of the gateway → the same Triton (the JPEG), per protocol, interleaved; and the gateway's CPU per request (the work the
    extra hop adds, whatever the load from other processes does to wall-clock figures)."""
    import tritonclient.grpc as tg
    import tritonclient.http as th
    from cvops.preprocess import preprocess_bytes
    from cvops.bundle import ModelBundle
    from cvops.triton import TritonServer, build_repository
    spec = ModelBundle.load(bundle).spec
    build_repository(bundle, tmp / "repo-direct", "shapes", 1, variant="python")
    env = {"CVOPS_HOME": str(tmp / "home")}
    with TritonServer(tmp / "repo-direct", log_file=tmp / "triton-direct.log") as ts, contextlib.ExitStack() as stack:
        direct = {"http": th.InferenceServerClient(ts.http_url.removeprefix("http://")),
                  "grpc": tg.InferenceServerClient(ts.grpc_url.removeprefix("grpc://"))}
        gws = {proto: stack.enter_context(Gateway("--model-dir", bundle, "--backend", "triton", "--triton-url", url, "--triton-protocol", proto,
                                                  env=env, log=tmp / f"gw-triton-{proto}.log"))
               for proto, url in (("http", ts.http_url), ("grpc", ts.grpc_url))}
        gcs = {proto: SyncClient(g.port) for proto, g in gws.items()}
        reqs = requests_for(jpegs)

        def call_direct(proto, d):
            x = preprocess_bytes(d, spec)[None]  # the client decodes too: same work as the gateway's
            m = th if proto == "http" else tg
            inp = m.InferInput("input", list(x.shape), "FP32")
            if proto == "http": inp.set_data_from_numpy(x, binary_data=True)
            else: inp.set_data_from_numpy(x)
            out = m.InferRequestedOutput("logits", binary_data=True) if proto == "http" else m.InferRequestedOutput("logits")
            direct[proto].infer("shapes", [inp], model_version="1", outputs=[out])

        lat = {f"{w} {p}": [] for p in gws for w in ("direct", "gateway")}
        cpu = {p: 0.0 for p in gws}
        for i in range(n + 20):
            for proto in gws:
                t0 = time.perf_counter(); call_direct(proto, jpegs[i % len(jpegs)]); t1 = time.perf_counter()
                c0 = cpu_seconds(gws[proto].proc.pid)
                t2 = time.perf_counter(); gcs[proto].call(reqs[i % len(reqs)]); t3 = time.perf_counter()
                if i >= 20:
                    lat[f"direct {proto}"].append(t1 - t0); lat[f"gateway {proto}"].append(t3 - t2)
                    cpu[proto] += cpu_seconds(gws[proto].proc.pid) - c0
        for c in gcs.values(): c.close()
        for c in direct.values(): c.close()
    out = {k: pct(v, 50) for k, v in lat.items()}
    for proto in gws:
        out[f"difference_{proto}_ms"] = out[f"gateway {proto}"] - out[f"direct {proto}"]
        # how sure that difference is: the median of the calls' paired differences (each gateway call against the direct
        # call just before it), with a bootstrap 95 % interval
        d = (np.asarray(lat[f"gateway {proto}"]) - np.asarray(lat[f"direct {proto}"])) * 1000
        out[f"paired_difference_{proto}_ms"], out[f"paired_difference_{proto}_ci95_ms"] = median_ci95(d)
        out[f"gateway_cpu_ms_per_request_{proto}"] = cpu[proto] / n * 1000
    out["difference_ms"] = min(out["difference_http_ms"], out["difference_grpc_ms"])
    out["loadavg"] = os.getloadavg()[0]
    print("  Triton p50 ms: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} [{v[0]:.2f}, {v[1]:.2f}]" for k, v in out.items()), flush=True)
    return out


def draft_figures(tmp: Path, n: int) -> dict:
    "Top-1 agreement of reduced-scale with full JPEG decoding on held-out large photos (a resnet18 trained on other photos)."
    rn = train_photo_classifier(tmp / "resnet")
    return draft_agreement(rn, large_photos(n, size=(1024, 768), seed=11))


WORKERS = "cvops gateway, workers = cores"


def two_model_rss(bundle: Path, tmp: Path) -> float:
    "Resident MB of one gateway process serving two models (the bench's bundle under two names), after traffic to both."
    import httpx
    (tmp / "two.yaml").write_text(f"models:\n  - {{name: a, model_dir: {bundle}}}\n  - {{name: b, model_dir: {bundle}}}\n")
    body = (tmp / "small.jpg").read_bytes()
    with Gateway("--config", tmp / "two.yaml", env={"CVOPS_HOME": str(tmp / "home")}, log=tmp / "two.log") as g, httpx.Client(base_url=g.url) as c:
        for _ in range(50):
            for m in ("a", "b"): c.post(f"/v1/models/{m}/predict", content=body, headers={"content-type": "image/jpeg"}).raise_for_status()
        return g.rss_mb()


def _interval_rows(name: str, ci: list | None) -> list[tuple]:
    "Two informational rows of the targets table: the low and high ends of an interval (n/a when it was not measured)."
    return [(f"{name}, {end} (ms)", (ci or [None, None])[i], "", None, "le") for i, end in enumerate(("low", "high"))]


def peers_main(a, tmp, bundle, jpegs, res):
    print(f"peers (hey), {a.peer_runs} runs, medians:", flush=True)
    res["peers"] = peer_figures(bundle, tmp, a.peer_requests, a.big_requests, a.peer_runs, a.peer_seconds)
    res["rss_two_models_mb"] = two_model_rss(bundle, tmp)
    if not a.no_triton:
        res["triton_direct"] = triton_direct_figures(bundle, tmp, jpegs, a.triton_requests)
    if not a.no_draft: res["draft"] = draft_figures(tmp, a.draft_photos)
    S, rows = res["peers"]["servers"], []
    get = lambda s, k, f: S.get(s, {}).get(k, {}).get(f)
    cv, nv, ls_ = "cvops gateway", "naive FastAPI + ORT", "LitServe batched"
    def ratio(x, y): return x / y if x and y else None
    rows.append(("12 MP JPEG c4 req/s: cvops ÷ naive", ratio(get(cv, "big_c4", "req_s"), get(nv, "big_c4", "req_s")), "≥ 3×", TARGETS["big_vs_naive"], "ge"))
    rows.append(("12 MP JPEG c1 p50 ms, cvops", get(cv, "big_c1", "p50_ms"), "≤ 40 ms", TARGETS["big_c1_p50_ms"], "le"))
    rows.append(("64 px JPEG c16 req/s: cvops ÷ LitServe", ratio(get(cv, "small_c16", "req_s"), get(ls_, "small_c16", "req_s")), "≥ 1.3×", TARGETS["small_c16_vs_litserve"], "ge"))
    rows.append(("64 px JPEG c16 req/s: cvops ÷ naive", ratio(get(cv, "small_c16", "req_s"), get(nv, "small_c16", "req_s")), "≥ 1.2×", TARGETS["small_c16_vs_naive"], "ge"))
    side = res["peers"].get("small_c1_interleaved", {})
    rows.append(("64 px JPEG c64 req/s: cvops ÷ LitServe", ratio(get(cv, "small_c64", "req_s"), get(ls_, "small_c64", "req_s")), "", None, "ge"))
    rows.append(("64 px JPEG c64 req/s: cvops ÷ naive", ratio(get(cv, "small_c64", "req_s"), get(nv, "small_c64", "req_s")), "", None, "ge"))
    rows.append(("64 px JPEG c1 p50: cvops − naive, side by side (ms)", side.get("difference_ms"), "≤ 0 ms", 0.0, "le"))
    rows += _interval_rows("   95 % interval of that difference", side.get("difference_ci95_ms"))
    rows.append(("   the same, from the runs one after the other (ms)", (get(cv, "small_c1", "p50_ms") or 0) - (get(nv, "small_c1", "p50_ms") or 0), "", None, "le"))
    wk = WORKERS  # the same targets, for the multi-process gateway
    rows.append(("12 MP JPEG c4 req/s: cvops workers ÷ naive", ratio(get(wk, "big_c4", "req_s"), get(nv, "big_c4", "req_s")), "≥ 3×", TARGETS["big_vs_naive"], "ge"))
    rows.append(("64 px JPEG c16 req/s: cvops workers ÷ LitServe", ratio(get(wk, "small_c16", "req_s"), get(ls_, "small_c16", "req_s")), "≥ 1.3×", TARGETS["small_c16_vs_litserve"], "ge"))
    rows.append(("64 px JPEG c16 req/s: cvops workers ÷ naive", ratio(get(wk, "small_c16", "req_s"), get(nv, "small_c16", "req_s")), "≥ 1.2×", TARGETS["small_c16_vs_naive"], "ge"))
    rows.append(("64 px JPEG c16 req/s: cvops workers ÷ cvops one process", ratio(get(wk, "small_c16", "req_s"), get(cv, "small_c16", "req_s")), "", None, "ge"))
    rows.append(("12 MP JPEG c4 req/s: cvops workers ÷ cvops one process", ratio(get(wk, "big_c4", "req_s"), get(cv, "big_c4", "req_s")), "", None, "ge"))
    if "triton_direct" in res:
        td = res["triton_direct"]
        for proto in ("http", "grpc"):
            rows.append((f"gateway→Triton p50 − direct tritonclient p50, {proto}{' (default)' if proto == 'http' else ''} (ms)", td[f"difference_{proto}_ms"], "≤ 0.5 ms", TARGETS["triton_minus_direct_ms"], "le"))
            rows.append((f"   median of paired call differences, {proto} (ms)", td[f"paired_difference_{proto}_ms"], "", None, "le"))
            rows += _interval_rows("   95 % interval of that median", td[f"paired_difference_{proto}_ci95_ms"])
            rows.append((f"   gateway CPU ms per request, → Triton {proto}", td[f"gateway_cpu_ms_per_request_{proto}"], "", None, "le"))
    if "draft" in res: rows.append(("reduced-scale vs full decoding, top-1 agreement", res["draft"]["agreement"], "≥ 99.5 %", TARGETS["draft_agreement"], "ge"))
    rows.append(("gateway RSS MB (one model)", S.get(cv, {}).get("rss_mb"), "≤ 250 MB", TARGETS["rss_mb"], "le"))
    rows.append(("gateway RSS MB, two models in one process", res.get("rss_two_models_mb"), "≤ 250 MB", TARGETS["rss_mb"], "le"))
    rows.append(("gateway RSS MB per worker (largest, one model)", S.get(wk, {}).get("rss_mb"), "≤ 250 MB", TARGETS["rss_mb"], "le"))
    print("\n{:<32} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}".format("server", "64px c1", "p50 ms", "64px c16", "64px c64", "12MP c1", "p50 ms", "12MP c4"))
    for name, r in S.items():
        if "error" in r: print(f"{name:<32} {r['error']}"); continue
        print(f"{name:<32} {r['small_c1']['req_s']:>10.0f} {r['small_c1']['p50_ms']:>10.1f} {r['small_c16']['req_s']:>10.0f} {r['small_c64']['req_s']:>10.0f} "
              f"{r['big_c1']['req_s']:>10.1f} {r['big_c1']['p50_ms']:>10.1f} {r['big_c4']['req_s']:>10.1f}")
    d = res.get("draft")
    if d: print(f"\nreduced-scale decoding on {d['n']} held-out 1024x768 photos: agreement {d['agreement']:.1%} ({d['flipped']} flipped, top-2 gap of "
          f"those ≤ {d['flipped_top2_gap_max']:.2e}, median gap {d['top2_gap_median']:.2e}); pixels differ by {d['pixel_mean_abs_diff']:.3f} on average")
    print("\n{:<52} {:>10}  {:<10}".format("measure (issue 14)", "measured", "target"))
    res["peer_summary"] = {}
    for name, val, target, lim, how in rows:
        ok = None if val is None or lim is None else (val >= lim if how == "ge" else val <= lim)
        res["peer_summary"][name] = {"measured": val, "target": target, "met": ok}
        shown = "n/a" if val is None else f"{val:.3f}"
        print(f"{name:<52} {shown:>10}  {target:<10}{'' if ok is None else ('  ok' if ok else '  MISSED')}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="mobilenet_v3_small")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6, help="interleaved measurement rounds (each path measured once per round)")
    ap.add_argument("--block", type=int, default=100, help="requests per concurrency-1 block (x4 per concurrency-16 block)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--no-triton", action="store_true")
    ap.add_argument("--only-peers", action="store_true", help="only the peer comparison, the Triton difference and the decoding agreement")
    ap.add_argument("--no-peers", action="store_true", help="skip the peer comparison")
    ap.add_argument("--peer-requests", type=int, default=2000, help="hey requests per 64 px run at concurrency 16 and 64 when --peer-seconds is 0 (a quarter of this at 1)")
    ap.add_argument("--peer-seconds", type=float, default=4, help="each 64 px run at concurrency 16 and 64 lasts this long (0: --peer-requests requests)")
    ap.add_argument("--peer-runs", type=int, default=3, help="rounds of the peer comparison (medians are reported)")
    ap.add_argument("--only-triton", action="store_true", help="only the gateway→Triton vs direct tritonclient figure")
    ap.add_argument("--triton-requests", type=int, default=400, help="calls per path and protocol for the gateway→Triton vs direct figure")
    ap.add_argument("--no-draft", action="store_true", help="skip the decoding agreement (it exports a resnet18)")
    ap.add_argument("--big-requests", type=int, default=60, help="hey requests per 12 MP run at concurrency 4 (a quarter at 1)")
    ap.add_argument("--draft-photos", type=int, default=200, help="held-out large photos for the decoding agreement")
    ap.add_argument("--only-detection", action="store_true", help="only detection beside classification (issue 17)")
    ap.add_argument("--no-detection", action="store_true", help="skip the detection rows")
    ap.add_argument("--detection-requests", type=int, default=200, help="hey requests per detection run at concurrency 16 (a quarter at 1)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cvops-bench-serve-"))
    from PIL import Image
    pngs = make_images(tmp / "images", n=32, size=a.size)
    bundle = make_bundle(tmp / "bundle", pngs, size=a.size, backbone=a.backbone)
    jpegs = []
    for p in pngs:
        buf = io.BytesIO(); Image.open(p).convert("RGB").save(buf, "JPEG", quality=90); jpegs.append(buf.getvalue())
    reqs = requests_for(jpegs)
    ip = InProcess(bundle)
    res = {"machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "python": platform.python_version(),
                       "platform": platform.platform()},
           "model": {"backbone": a.backbone, "size": a.size, "onnx_bytes": (bundle / "model.onnx").stat().st_size,
                     "jpeg_bytes_mean": int(statistics.mean(map(len, jpegs)))},
           "method": "all paths measured in interleaved blocks (round-robin), so drifting load from other processes hits each alike"}
    print(f"model {a.backbone} at {a.size} px; {len(jpegs)} JPEGs of ~{res['model']['jpeg_bytes_mean']} B; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores", flush=True)
    if a.only_triton:
        res["triton_direct"] = triton_direct_figures(bundle, tmp, jpegs, a.triton_requests)
        return _write(res, a.out)
    if a.only_peers:
        peers_main(a, tmp, bundle, jpegs, res)
        return _write(res, a.out)
    if a.only_detection:
        a.out = a.out.replace("serve.json", "serve_detection.json")  # the full run's figures stay where they are
        print("detection beside classification (hey):", flush=True)
        res["detection"] = detection_figures(tmp, a.detection_requests)
        return _write(res, a.out)
    res["in_process_tensor"] = tensor_figures(ip, jpegs, a.block * 4)

    # every gateway up at once (idle ones cost nothing), then round-robin blocks
    gateways, stack = {}, contextlib.ExitStack()
    env = {"CVOPS_HOME": str(tmp / "home")}
    gateways["gateway, micro-batching"] = stack.enter_context(Gateway("--model-dir", bundle, env=env, log=tmp / "gb.log"))
    gateways["gateway, no batching"] = stack.enter_context(Gateway("--model-dir", bundle, "--batching", "false", env=env, log=tmp / "gn.log"))
    if not a.no_triton:
        from cvops.triton import TritonServer, build_repository
        build_repository(bundle, tmp / "repo", "shapes", 1, variant="python")
        ts = stack.enter_context(TritonServer(tmp / "repo", log_file=tmp / "triton.log"))
        for proto, url in (("grpc", ts.grpc_url), ("http", ts.http_url)):
            gateways[f"gateway → Triton {proto}"] = stack.enter_context(Gateway(
                "--model-dir", bundle, "--backend", "triton", "--triton-url", url, "--triton-protocol", proto, env=env, log=tmp / f"gt{proto}.log"))
    with stack:
        clients = {k: SyncClient(g.port) for k, g in gateways.items()}
        ref = ip.full(jpegs[0])[0][0]
        for k, c in clients.items():  # warm-up, and every path gives the in-process answer
            for r in reqs * 2: c.call(r)
            got = json.loads(c.call(reqs[0]))["predictions"][0]["label"]
            assert got == ref, (k, got, ref)
            concurrent_block(gateways[k].port, reqs, a.concurrency, a.concurrency * 4)
        c1 = {k: [] for k in ["in-process"] + list(gateways)}
        thr = {k: [0, 0.0] for k in c1}
        for rnd in range(a.rounds):
            lat = c1["in-process"]
            for i in range(a.block):
                t0 = time.perf_counter(); ip.full(jpegs[i % len(jpegs)]); lat.append(time.perf_counter() - t0)
            for k, c in clients.items():
                for i in range(a.block):
                    t0 = time.perf_counter(); c.call(reqs[i % len(reqs)]); c1[k].append(time.perf_counter() - t0)
            n = a.block * 4
            t0 = time.perf_counter()
            for i in range(n): ip.full(jpegs[i % len(jpegs)])
            thr["in-process"][0] += n; thr["in-process"][1] += time.perf_counter() - t0
            for k, g in gateways.items():
                wall, _ = concurrent_block(g.port, reqs, a.concurrency, n)
                thr[k][0] += n - n % a.concurrency; thr[k][1] += wall
            print(f"  round {rnd + 1}/{a.rounds}: load average {os.getloadavg()[0]:.1f}", flush=True)
        # CPU per image: the work each path costs, whatever the load from other processes does to wall-clock figures
        n = a.block * 4
        t0 = time.process_time()
        for i in range(n): ip.full(jpegs[i % len(jpegs)])
        cpu = {"in-process": (time.process_time() - t0) / n}
        for k, g in gateways.items():
            c0 = cpu_seconds(g.proc.pid)
            for i in range(n): clients[k].call(reqs[i % len(reqs)])
            cpu[k] = (cpu_seconds(g.proc.pid) - c0) / n
        for c in clients.values(): c.close()
        rss = {k: g.rss_mb() for k, g in gateways.items()}
        res["paths"] = {k: {"c1_p50_ms": pct(c1[k], 50), "c1_p99_ms": pct(c1[k], 99), "c1_n": len(c1[k]),
                            f"c{a.concurrency}_img_s" if k != "in-process" else "sequential_img_s": thr[k][0] / thr[k][1],
                            "cpu_ms_per_image_c1": cpu[k] * 1000, **({"rss_mb": rss[k]} if k in rss else {})} for k in c1}

    P, ck = res["paths"], f"c{a.concurrency}_img_s"
    ipp, gb, gn = P["in-process"], P["gateway, micro-batching"], P["gateway, no batching"]
    overhead = gb["c1_p50_ms"] - ipp["c1_p50_ms"]
    ratio, ratio_nb = gb[ck] / ipp["sequential_img_s"], gn[ck] / ipp["sequential_img_s"]
    cpu_overhead = gb["cpu_ms_per_image_c1"] - ipp["cpu_ms_per_image_c1"]
    summary = {"overhead_ms": overhead, "cpu_overhead_ms": cpu_overhead, "overhead_ms_no_batching": gn["c1_p50_ms"] - ipp["c1_p50_ms"], "throughput_ratio": ratio,
               "throughput_ratio_no_batching": ratio_nb, "micro_batching_gain": gb[ck] / gn[ck], "rss_mb": gb["rss_mb"]}
    rows = [("gateway c1 p50 − in-process p50 (decode+preprocess+infer)", f"{overhead:.2f} ms", f"≤ {TARGETS['overhead_ms']} ms (naive: 2.4 ms)", overhead <= TARGETS["overhead_ms"]),
            ("   gateway CPU ms/request − in-process CPU ms/image (c1; load-independent)", f"{cpu_overhead:.2f} ms", "", None),
            (f"gateway c{a.concurrency} img/s ÷ in-process sequential, micro-batching", f"{ratio:.2f}×", f"(was ≥ {TARGETS['throughput_ratio']}×; naive: 0.63×)", None),
            (f"gateway c{a.concurrency} img/s ÷ in-process sequential, no batching", f"{ratio_nb:.2f}×", "", None),
            ("micro-batching gain", f"{summary['micro_batching_gain']:.2f}×", "", None)]
    for proto in ("grpc", "http"):
        k = f"gateway → Triton {proto}"
        if k in P:
            tr = P[k]["c1_p50_ms"] / gb["c1_p50_ms"]; summary[f"triton_{proto}_ratio"] = tr
            rows.append((f"gateway→Triton ({proto}) p50 ÷ gateway in-process p50", f"{tr:.2f}×", f"(was ≤ {TARGETS['triton_ratio']}×)", None))
    rows.append(("gateway resident memory, model loaded", f"{gb['rss_mb']:.0f} MB", f"≤ {TARGETS['rss_mb']:.0f} MB", gb["rss_mb"] <= TARGETS["rss_mb"]))
    res["summary"], res["targets"] = summary, TARGETS
    res["machine"]["loadavg_end"] = os.getloadavg()

    print("\n{:<34} {:>9} {:>9} {:>9} {:>14} {:>8}".format("path", "c1 p50 ms", "c1 p99 ms", "CPU ms/im", f"c{a.concurrency} img/s", "RSS MB"))
    for b, t in res["in_process_tensor"].items():
        print(f"{'in-process tensor, batch ' + b[1:]:<34} {t['p50_ms']:>9.2f} {t['p99_ms']:>9.2f} {'':>9} {t['img_s']:>14.0f} {'':>8}")
    for k, r in P.items():
        name = "in-process decode+prep+infer" if k == "in-process" else k
        thr_s = f"{r.get(ck, r.get('sequential_img_s')):.0f}" + (" (seq)" if k == "in-process" else "")
        rss_s = f"{r['rss_mb']:.0f}" if "rss_mb" in r else ""
        print(f"{name:<34} {r['c1_p50_ms']:>9.2f} {r['c1_p99_ms']:>9.2f} {r['cpu_ms_per_image_c1']:>9.2f} {thr_s:>14} {rss_s:>8}")
    print("\n{:<66} {:>9}  {:<28}".format("measure (vs in-process; 'was': an earlier SPEC §7 target, now the peer rows below)", "measured", "target"))
    for name, val, target, ok in rows:
        print(f"{name:<66} {val:>9}  {target:<28}{'' if ok is None else ('  ok' if ok else '  MISSED')}")
    if not a.no_peers: peers_main(a, tmp, bundle, jpegs, res)
    if not a.no_detection:
        print("detection beside classification (hey):", flush=True)
        res["detection"] = detection_figures(tmp, a.detection_requests)
    _write(res, a.out)


def _write(res: dict, out: str):
    res["machine"]["loadavg_end"] = os.getloadavg()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=2, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    from cvops.config import set_process_defaults
    set_process_defaults()  # an entry point: passive OpenMP waiting before torch (the bundle export) is imported
    main()
