"""Detection training on the CPU (issue 17): which detector reaches the best test mAP@.5 within a wall-clock budget on
synthetic shapes (1–4 objects per 128 px image, `cvops.synth.generate_detection`). Each detector is trained from
scratch (weights=None) with cvops' pieces (`build_detector`, `augment_boxes`, the shared preprocessing, `map50`) by a
plain loop with AdamW and a cosine schedule over the time budget; test mAP@.5 is measured at checkpoints along the way
(the curve), training images/s beside it. Prints each detector's curve, its best mAP@.5 beside the target, and writes
bench/results/detection.json (or --out)."""
import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from cvops.config import set_process_defaults

set_process_defaults()  # an entry point: passive OpenMP waiting before torch is imported
ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.6  # test mAP@.5 within 15 minutes of CPU training (issue 17)


def load_split(folder, ids, classes, size):
    "Images (N, 3, S, S) normalised with the shared preprocessing and their targets, for the given image ids."
    import numpy as np
    import torch
    from cvops.detection import to_targets
    from cvops.preprocess import PreprocessSpec, decode_resized, normalize
    spec = PreprocessSpec(size=size)
    doc = json.loads((folder / "annotations.json").read_text())
    cats = {c["id"]: c["name"] for c in doc["categories"]}
    by_image = {}
    for a in doc["annotations"]: by_image.setdefault(a["image_id"], []).append(a)
    ims = {im["id"]: im for im in doc["images"]}
    x = np.empty((len(ids), 3, size, size), np.float32); targets = []
    for k, i in enumerate(ids):
        im = ims[i]
        x[k] = normalize(decode_resized((folder / "images" / im["file_name"]).read_bytes(), spec), spec)
        dets = [{"label": cats[a["category_id"]], "bbox": [a["bbox"][0] / im["width"], a["bbox"][1] / im["height"],
                                                           a["bbox"][2] / im["width"], a["bbox"][3] / im["height"]]}
                for a in by_image.get(i, [])]
        targets.append(to_targets(dets, classes, size))
    return torch.from_numpy(x), targets


def evaluate(model, x, targets, batch=32):
    import torch
    from cvops.detection import map50
    model.eval(); preds = []
    with torch.no_grad():
        for i in range(0, len(x), batch): preds += [{k: v.cpu() for k, v in p.items()} for p in model(list(x[i:i + batch]))]
    model.train()
    return map50(preds, targets)


def run(name, data, classes, size, budget, lr, batch, evals, seed=0):
    "Train `name` for `budget` seconds; test mAP@.5 at `evals` evenly spaced points; images/s of training alone."
    import torch
    from cvops.detection import augment_boxes, build_detector
    torch.manual_seed(seed)
    (xtr, ttr), (xte, tte) = data
    model = build_detector(name, len(classes) + 1, size).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    gen, order_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    curve, seen, train_s, next_eval, t0 = [], 0, 0.0, budget / evals, time.perf_counter()
    while train_s < budget:
        for idx in torch.randperm(len(xtr), generator=order_gen).split(batch):
            if len(idx) < 2 or train_s >= budget: continue
            frac = train_s / budget  # warm-up then cosine, over the time budget (the step count is unknown)
            for g in opt.param_groups: g["lr"] = lr * min(1.0, frac / 0.05 + 0.01) * 0.5 * (1 + math.cos(math.pi * frac))
            ts = time.perf_counter()
            x, t = augment_boxes(xtr[idx], [ttr[i] for i in idx], gen)
            loss = sum(model(list(x), t).values())
            opt.zero_grad(); loss.backward(); opt.step()
            train_s += time.perf_counter() - ts; seen += len(idx)
            if not math.isfinite(loss.item()): raise SystemExit(f"{name}: loss is {loss.item()}")
            if train_s >= next_eval or train_s >= budget:
                m = evaluate(model, xte, tte)
                curve.append(dict(train_s=round(train_s, 1), images=seen, loss=round(loss.item(), 4), map50=round(m, 4)))
                print(f"  {name}: {train_s:6.0f} s  {seen:6d} img  loss {loss.item():.3f}  test mAP@.5 {m:.3f}", flush=True)
                next_eval += budget / evals
    return dict(detector=name, train_images_per_s=round(seen / train_s, 2), curve=curve,
                best_map50=max(c["map50"] for c in curve), final_map50=curve[-1]["map50"],
                wall_s=round(time.perf_counter() - t0, 1), lr=lr, batch=batch)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--detectors", default="fcos_tiny_fpn,ssdlite320_mobilenet_v3_large", help="comma-separated names in cvops.detection.DETECTORS")
    ap.add_argument("--budget", type=float, default=900, help="training seconds per detector (issue: 15 minutes)")
    ap.add_argument("--train", type=int, default=1500, help="training images")
    ap.add_argument("--test", type=int, default=200, help="test images")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--evals", type=int, default=6, help="test evaluations along the budget (the curve)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "detection.json"))
    a = ap.parse_args(argv)
    import torch
    from cvops.synth import SHAPES, generate_detection
    if a.threads: torch.set_num_threads(a.threads)
    classes = sorted(SHAPES)
    with tempfile.TemporaryDirectory() as d:
        generate_detection(out=d, n=a.train + a.test, seed=0, size=a.size, progress=False)
        ids = list(range(1, a.train + a.test + 1))
        data = (load_split(Path(d), ids[:a.train], classes, a.size), load_split(Path(d), ids[a.train:], classes, a.size))
    results = []
    for name in a.detectors.split(","):
        results.append(run(name, data, classes, a.size, a.budget, a.lr, a.batch, a.evals))
    print(f"\n{'detector':40s} {'train img/s':>11s} {'best test mAP@.5':>17s}  target ≥ {TARGET}")
    for r in results:
        print(f"{r['detector']:40s} {r['train_images_per_s']:11.1f} {r['best_map50']:17.3f}  {'met' if r['best_map50'] >= TARGET else 'NOT met'}")
    doc = dict(target_map50=TARGET, budget_s=a.budget, size=a.size, train_images=a.train, test_images=a.test,
               threads=torch.get_num_threads(), cpu_count=os.cpu_count(), cuda=torch.cuda.is_available(), results=results)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True); Path(a.out).write_text(json.dumps(doc, indent=1))
    return 0 if any(r["best_map50"] >= TARGET for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
