"""Benchmark of drift on live traffic (issue 13's targets), all figures from one run, printed beside the targets and
written to bench/results/drift.json:

- detection delay: requests from the onset of drift (the synthetic generator's brightness and blur knobs, at the
  demo's strength) until the gateway's window (300 requests, scored every 100, as `cvops serve` defaults) flags it;
  target ≤ 300 requests;
- false alarms: the share of windows flagged on undrifted traffic over 20+ disjoint windows; target ≤ 5 %;
- cost: the gateway's throughput with drift tracking on and off (`hey`, 64 px PNG, concurrency 16, the same bundle
  with its drift reference, the shipped settings: a score at most every 2 s), interleaved rounds; target: on ≥ 0.95 × off.

The detection and false-alarm figures run the very code the gateway runs (`cvops.drift.DriftWindow` over the bundle's
ONNX Runtime outputs and `preprocess.image_statistics`) in this process, request by request.

    .venv/bin/python bench/drift.py [--windows 20] [--rounds 3] [--requests 2000]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
DEMO_DRIFT = dict(brightness=1.8, blur=1.0)  # the demo's drift strength (cvops demo --loop)


def features(bundle, paths):
    "What the gateway feeds its drift window per request: statistics, embedding, predicted class."
    from cvops.bundle import EMBEDDING_NAME, INPUT_NAME, OUTPUT_NAME, ModelBundle
    from cvops.preprocess import decode_resized, image_statistics, normalize
    from PIL import Image
    b = ModelBundle.load(bundle); sess = b.session()
    out = []
    for i in range(0, len(paths), 64):
        datas = [p.read_bytes() for p in paths[i:i + 64]]
        px = [decode_resized(d, b.spec) for d in datas]
        logits, emb = sess.run([OUTPUT_NAME, EMBEDDING_NAME], {INPUT_NAME: normalize(np.stack(px), b.spec)})
        for d, p, l, e in zip(datas, px, logits, emb):
            import io
            out.append((image_statistics(p, Image.open(io.BytesIO(d)).size), b.classes[int(l.argmax())], e))
    return b, out


def detection(bundle, clean, drifted, policy) -> dict:
    "Requests after the onset until the window flags drift, with clean traffic filling the window first."
    from cvops.drift import DriftWindow
    b, fc = features(bundle, clean); _, fd = features(bundle, drifted)
    w = DriftWindow(b.reference(), policy)
    flagged_before = 0
    for st, c, e in fc[:policy.window]:
        w.add(st, c, e)
        if w.due: flagged_before += w.score().drift
    for k, (st, c, e) in enumerate(fd, 1):
        w.add(st, c, e)
        if w.due and w.score().drift: return {"requests_to_detect": k, "flagged_before_onset": flagged_before}
    return {"requests_to_detect": None, "flagged_before_onset": flagged_before}


def false_alarms(bundle, clean, policy) -> dict:
    "Disjoint windows of undrifted traffic: how many are flagged."
    from cvops.drift import score_window
    b, f = features(bundle, clean)
    ref, n, flags, pmins = b.reference(), policy.window, [], []
    for i in range(0, len(f) - n + 1, n):
        chunk = f[i:i + n]
        stats = {k: [s[k] for s, _, _ in chunk] for k in chunk[0][0]}
        s = score_window(ref, stats, np.stack([e for _, _, e in chunk]), [c for _, c, _ in chunk], policy)
        flags.append(s.drift); pmins.append(s.p_min)
    return {"windows": len(flags), "flagged": int(sum(flags)), "rate": float(np.mean(flags)), "p_min": [round(p, 4) for p in pmins]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=20, help="disjoint undrifted windows for the false-alarm rate")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds (drift on, drift off)")
    ap.add_argument("--requests", type=int, default=2000, help="hey requests per throughput run (concurrency 16)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "drift.json"))
    a = ap.parse_args()
    from cvops.drift import DriftPolicy
    from cvops.synth import generate
    from serve_helpers import Gateway, make_bundle, make_images
    sys.path.insert(0, str(ROOT / "bench"))
    from serve import hey
    policy = DriftPolicy()  # the gateway's defaults: window 300, scored every 100 requests
    res = {"machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}, "policy": policy.model_dump()}
    with tempfile.TemporaryDirectory(prefix="cvops-bench-drift-") as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        train = make_images(tmp / "train", n=400, seed=0)
        # traffic arrives in no particular order: the generator's files are sorted by class, so shuffle them
        rng = np.random.default_rng(0)
        clean = list(rng.permutation(make_images(tmp / "clean", n=policy.window * a.windows, seed=1)))
        generate(out=tmp / "drifted", n=policy.window * 2, seed=2, progress=False, **DEMO_DRIFT)
        drifted = list(rng.permutation(sorted((tmp / "drifted").rglob("*.png"))))
        train = list(rng.permutation(train))
        bundle = make_bundle(tmp / "bundle", train, reference=train[:300])
        print(f"data and bundle in {time.time() - t0:.0f} s; drift strength {DEMO_DRIFT}")
        res["detection"] = detection(bundle, clean[:policy.window], drifted, policy)
        res["false_alarms"] = false_alarms(bundle, clean, policy)
        png = clean[0]
        runs = {"on": [], "off": []}
        for r in range(a.rounds):
            for mode in ("on", "off"):
                args = ["--model-dir", bundle] + ([] if mode == "on" else ["--no-drift"])  # the shipped drift settings
                with Gateway(*args, env={"CVOPS_HOME": str(tmp / "home")}, log=tmp / f"gw-{mode}.log") as g:
                    hey(g.url + "/v1/predict", png, "image/png", 200, 4)  # warm-up
                    runs[mode].append(hey(g.url + "/v1/predict", png, "image/png", a.requests, 16)["req_s"])
        on, off = float(np.median(runs["on"])), float(np.median(runs["off"]))
        res["throughput"] = {"on_req_s": runs["on"], "off_req_s": runs["off"], "ratio": on / off}
    d, fa, tp = res["detection"], res["false_alarms"], res["throughput"]
    print(f"\n{'measure':<48}{'measured':>22}{'target':>14}")
    print(f"{'requests from onset to the drift flag':<48}{str(d['requests_to_detect']):>22}{'≤ 300':>14}")
    print(f"{'false alarms on undrifted windows':<48}{fa['flagged']:>12} / {fa['windows']} ({fa['rate']:.0%}){'≤ 5 %':>14}")
    print(f"{'throughput, drift on ÷ off (64 px PNG, c16)':<48}{tp['ratio']:>21.3f}×{'≥ 0.95×':>14}")
    print(f"  on: {', '.join(f'{x:.0f}' for x in tp['on_req_s'])} req/s; off: {', '.join(f'{x:.0f}' for x in tp['off_req_s'])} req/s")
    res["machine"]["loadavg_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True); Path(a.out).write_text(json.dumps(res, indent=2, default=str))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    from cvops.config import set_process_defaults
    set_process_defaults()
    main()
