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

    .venv/bin/python bench/serve.py [--backbone mobilenet_v3_small] [--size 64] [--rounds 6] [--block 100]
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
from serve_helpers import Gateway, make_bundle, make_images  # noqa: E402

TARGETS = {"overhead_ms": 1.0, "throughput_ratio": 1.3, "triton_ratio": 1.5, "rss_mb": 250.0}


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="mobilenet_v3_small")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6, help="interleaved measurement rounds (each path measured once per round)")
    ap.add_argument("--block", type=int, default=100, help="requests per concurrency-1 block (x4 per concurrency-16 block)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--no-triton", action="store_true")
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
            (f"gateway c{a.concurrency} img/s ÷ in-process sequential, micro-batching", f"{ratio:.2f}×", f"≥ {TARGETS['throughput_ratio']}× (naive: 0.63×)", ratio >= TARGETS["throughput_ratio"]),
            (f"gateway c{a.concurrency} img/s ÷ in-process sequential, no batching", f"{ratio_nb:.2f}×", "", None),
            ("micro-batching gain", f"{summary['micro_batching_gain']:.2f}×", "", None)]
    for proto in ("grpc", "http"):
        k = f"gateway → Triton {proto}"
        if k in P:
            tr = P[k]["c1_p50_ms"] / gb["c1_p50_ms"]; summary[f"triton_{proto}_ratio"] = tr
            rows.append((f"gateway→Triton ({proto}) p50 ÷ gateway in-process p50", f"{tr:.2f}×", f"≤ {TARGETS['triton_ratio']}×", tr <= TARGETS["triton_ratio"]))
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
    print("\n{:<66} {:>9}  {:<28}".format("measure (SPEC §7)", "measured", "target"))
    for name, val, target, ok in rows:
        print(f"{name:<66} {val:>9}  {target:<28}{'' if ok is None else ('  ok' if ok else '  MISSED')}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    from cvops.config import set_process_defaults
    set_process_defaults()  # an entry point: passive OpenMP waiting before torch (the bundle export) is imported
    main()
