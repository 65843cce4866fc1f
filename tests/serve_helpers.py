"""Helpers shared by tests/test_serve.py and bench/serve.py: a real model bundle (a torchvision CNN exported with
cvops.export), synthetic test images, and a gateway running as a real `cvops serve` process on a free loopback port."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from cvops.toolenv import free_port  # noqa: F401 (one port helper: tests and bench import it from here)

BIN = Path(sys.executable).parent


def make_images(out: Path, n: int = 24, size: int = 64, seed: int = 0) -> list[Path]:
    "Synthetic shapes (cvops.synth), a few per class."
    from cvops.synth import generate
    generate(out=out, n=n, seed=seed, size=size, progress=False)
    return sorted(out.rglob("*.png"))


def make_bundle(out: Path, images: list[Path], size: int = 64, seed: int = 0, backbone: str = "mobilenet_v3_small",
                name: str = "shapes", reference: list[Path] | None = None) -> Path:
    "Export a seeded torchvision CNN into a model bundle (contract D) with cvops.export.export_bundle (with a drift reference from `reference`)."
    import torch, torchvision
    from cvops.export import export_bundle
    from cvops.preprocess import PreprocessSpec, preprocess_bytes
    torch.manual_seed(seed)
    model = getattr(torchvision.models, backbone)(num_classes=4)
    spec = PreprocessSpec(size=size)
    x = np.stack([preprocess_bytes(p.read_bytes(), spec) for p in images[:16]])
    # freshly initialised, a torchvision CNN answers logits of ~1e-10 (unit BatchNorm statistics shrink every layer), so
    # tolerances of 1e-5 could not tell a wrong answer from a right one: BatchNorm takes its statistics from the images
    # and the head is redrawn at unit scale, which gives logits of order 1 that differ from image to image
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm): m.momentum = None; m.reset_running_stats()  # momentum None: a plain average
    with torch.no_grad(): model.train()(torch.from_numpy(x))
    model.eval()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    torch.nn.init.normal_(head.weight, std=1.0)
    out, _ = export_bundle(model, ["circle", "square", "star", "triangle"], spec, out, x, tolerance=1e-3, name=name,
                           reference_images=[p.read_bytes() for p in reference] if reference else None)
    return out


def reference_topk(bundle: Path, data: bytes, k: int = 3) -> list[tuple[str, float]]:
    "The expected answer, computed in-process through the shared decode path: decode_resized → normalize → ONNX Runtime → softmax."
    import onnxruntime as ort
    from cvops.preprocess import PreprocessSpec, decode_resized, normalize
    spec = PreprocessSpec.load(bundle / "preprocess.json")
    classes = (bundle / "labels.txt").read_text().split()
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    z = sess.run(["logits"], {"input": normalize(decode_resized(data, spec), spec)[None]})[0][0].astype(np.float64)
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


def large_photos(n: int = 200, size: tuple[int, int] = (1600, 1200), seed: int = 7, quality: int = 90) -> list[bytes]:
    "Held-out phone-like photos: synthetic shapes drawn large, with noise and a gradient (JPEG, `size`), from their own seed."
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h // 8, 0:w // 8].astype(np.float32)
    out = []
    for i in range(n):
        bg = rng.uniform(40, 215, 3)
        grad = (xx / xx.max())[..., None] * rng.uniform(-40, 40, 3) + (yy / yy.max())[..., None] * rng.uniform(-40, 40, 3)
        small = np.clip(bg + grad + rng.normal(0, 12, grad.shape), 0, 255).astype(np.uint8)
        img = Image.fromarray(small).resize(size, Image.BILINEAR)
        d = ImageDraw.Draw(img)
        cx, cy, r = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, rng.uniform(0.15, 0.35) * min(w, h)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = i % 4
        if kind == 0: d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif kind == 1: d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif kind == 2: d.regular_polygon((cx, cy, r), 5, rotation=float(rng.uniform(0, 72)), fill=colour)
        else: d.regular_polygon((cx, cy, r), 3, rotation=float(rng.uniform(0, 120)), fill=colour)
        out.append(encode(img, "JPEG", quality=quality))
    return out


def draft_agreement(bundle: Path, photos: list[bytes]) -> dict:
    "Top-1 agreement of the model on reduced-scale decoding (the shared decode path) vs full decoding, and the largest input difference."
    from cvops.bundle import ModelBundle, ort_session
    from cvops.preprocess import decode_resized, load_image, normalize, resize_to
    b = ModelBundle.load(bundle)
    sess = ort_session(b.onnx_path)
    reduced = np.stack([decode_resized(d, b.spec) for d in photos])
    full = np.stack([resize_to(load_image(d), b.spec) for d in photos])
    run = lambda px: np.concatenate([sess.run([b.output_name], {b.input_name: normalize(px[i:i + 32], b.spec)})[0]
                                     for i in range(0, len(px), 32)])
    zr, zf = run(reduced), run(full)
    diff = np.abs(reduced.astype(np.int16) - full.astype(np.int16))
    flips = zr.argmax(1) != zf.argmax(1)
    top2 = np.sort(zf, axis=1)[:, -2:]
    return {"n": len(photos), "agreement": float(1 - flips.mean()), "flipped": int(flips.sum()),
            "flipped_top2_gap_max": float((top2[:, 1] - top2[:, 0])[flips].max()) if flips.any() else 0.0,
            "top2_gap_median": float(np.median(top2[:, 1] - top2[:, 0])),
            "pixel_mean_abs_diff": float(diff.mean()), "pixel_max_abs_diff": int(diff.max()),
            "logit_max_abs_diff": float(np.abs(zr - zf).max())}


def train_photo_classifier(out: Path, n: int = 240, epochs: int = 8, size: int = 64, seed: int = 5) -> Path:
    """A resnet18 trained on `n` large photos (`large_photos`, their own seed; the class is the shape drawn) through the
    shared decode path, exported as a bundle. An untrained network decides many photos on near-ties, which any change
    of a pixel flips: agreement figures need a model whose decisions mean something."""
    import torch, torchvision
    from cvops.export import export_bundle
    from cvops.preprocess import PreprocessSpec, decode_resized, normalize
    spec = PreprocessSpec(size=size)
    photos = large_photos(n, size=(1024, 768), seed=seed)
    x = torch.from_numpy(np.stack([normalize(decode_resized(d, spec), spec) for d in photos]))
    y = torch.arange(n) % 4  # large_photos draws shape i % 4: circle, square, star, triangle
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(n).split(32):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx]); opt.zero_grad(); loss.backward(); opt.step()
    out, _ = export_bundle(model.eval(), ["circle", "square", "star", "triangle"], spec, out, x[:16].numpy(),
                           tolerance=1e-3, name="photos")
    return out
