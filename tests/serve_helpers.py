"""Helpers shared by tests/test_serve.py and bench/serve.py: a real model bundle (a torchvision CNN exported with
cvops.export), synthetic test images, and a gateway running as a real `cvops serve` process on a free loopback port."""
from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def make_images(out: Path, n: int = 24, size: int = 64, seed: int = 0) -> list[Path]:
    "Synthetic shapes (cvops.synth), a few per class."
    from cvops.synth import generate
    generate(out=out, n=n, seed=seed, size=size, progress=False)
    return sorted(out.rglob("*.png"))


def make_bundle(out: Path, images: list[Path], size: int = 64, seed: int = 0, backbone: str = "mobilenet_v3_small",
                name: str = "shapes") -> Path:
    "Export a seeded torchvision CNN into a model bundle (contract D) with cvops.export.export_bundle."
    import torch, torchvision
    from cvops.export import export_bundle
    from cvops.preprocess import PreprocessSpec, preprocess_bytes
    torch.manual_seed(seed)
    model = getattr(torchvision.models, backbone)(num_classes=4).eval()
    spec = PreprocessSpec(size=size)
    x = np.stack([preprocess_bytes(p.read_bytes(), spec) for p in images[:16]])
    out, _ = export_bundle(model, ["circle", "square", "star", "triangle"], spec, out, x, tolerance=1e-3, name=name)
    return out


def reference_topk(bundle: Path, data: bytes, k: int = 3) -> list[tuple[str, float]]:
    "The expected answer, computed independently in-process: load_image → to_input → ONNX Runtime → softmax."
    import onnxruntime as ort
    from cvops.preprocess import PreprocessSpec, load_image, to_input
    spec = PreprocessSpec.load(bundle / "preprocess.json")
    classes = (bundle / "labels.txt").read_text().split()
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    z = sess.run(["logits"], {"input": to_input(load_image(data), spec)[None]})[0][0].astype(np.float64)
    p = np.exp(z - z.max()); p /= p.sum()
    return [(classes[i], float(p[i])) for i in np.argsort(-p, kind="stable")[:k]]


def encode(img, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO(); img.save(buf, fmt, **kw); return buf.getvalue()


class Gateway:
    "A `cvops serve` process on a free loopback port (context manager); stopped by PID."
    def __init__(self, *args, env: dict | None = None, cwd: Path | None = None, log: Path | None = None, timeout: float = 60):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args, self.env, self.cwd, self.timeout = [str(a) for a in args], env or {}, cwd, timeout
        self.log = log
        self.proc = None

    def start(self) -> "Gateway":
        cmd = [str(BIN / "cvops"), "serve", "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        self._logf = open(self.log, "w") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=self._logf, stderr=subprocess.STDOUT, cwd=self.cwd,
                                     env={**os.environ, **self.env}, start_new_session=True)
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cvops serve exited with {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=0.5).status_code == 200: return self
            except httpx.TransportError: pass
            time.sleep(0.1)
        self.stop(); raise RuntimeError(f"cvops serve not up after {self.timeout} s: {self.tail()}")

    def tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log and self.log.exists() else ""

    def rss_mb(self) -> float:
        "Resident memory of the gateway process, MB."
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"): return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try: self.proc.wait(15)
            except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()
        self.proc = None
        if self.log and self._logf is not subprocess.DEVNULL: self._logf.close()

    def __enter__(self): return self.start()
    def __exit__(self, *exc): self.stop()
