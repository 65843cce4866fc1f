"""Training data at scale (issue 15): synthetic datasets of 10,000 and 50,000 images at 128 px, old path vs new,
side by side: peak resident memory (each measurement in its own process, `ru_maxrss`) and images/s for ingest, the
first epoch and later epochs.

- ingest, old: every new file fully decoded (`load_image`); new: `verify_image` (PNG chunk CRCs, JPEG end marker +
  1/8-scale decode). The old ingest runs only up to `--old-ingest-max` images (it is the slow one).
- training, old: the whole split decoded into one float32 tensor in RAM, served by a `TensorDataset` (what
  `VersionDataModule` did); new: the uint8 image cache (`cvops.loader`), decoded once per (version, size) and read
  in batches, normalised in the module. The new path runs twice: a cold run (builds the cache) and a warm one
  (reuses it). The old path is skipped where its float32 tensor would not fit in half the machine's memory.
- Steps per epoch are capped (`--steps`): the measurement is about the data path, not the model.

Writes bench/results/scale.json."""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float: return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child_ingest(a) -> dict:
    "Ingest `a.src` into `a.dataset` (old: full decode per file); for the new path also create the version."
    from cvops.config import set_process_defaults
    set_process_defaults()
    import cvops.data as data
    from cvops.db import fiftyone_db
    from cvops.preprocess import load_image
    if a.path == "old": data.verify_image = lambda d, *args: load_image(d).size  # what ingest did before
    fiftyone_db()  # start the database outside the measurement
    t0 = time.perf_counter(); rep = data.ingest(a.src, a.dataset, progress=False); dt = time.perf_counter() - t0
    out = dict(seconds=round(dt, 2), images_per_s=round(rep.added / dt, 1), added=rep.added)
    if a.path == "new": out["version"] = data.create_version(a.dataset).id
    data.close_db()
    return dict(out, peak_rss_mb=round(_rss_mb()))


def _old_datamodule():
    "The data module as it was: every image decoded into one float32 tensor, served by a TensorDataset."
    import torch
    from cvops.tasks import VersionDataModule, decode_split
    class OldDataModule(VersionDataModule):
        def setup(self, stage=None):
            for split in (self.train_split, self.val_split):
                if split not in self.data: self.data[split] = decode_split(self.version, split, self.store, self.spec, self.classes)[:2]
        def _loader(self, split, train):
            ds = torch.utils.data.TensorDataset(*self.data[split])
            return torch.utils.data.DataLoader(ds, batch_size=self.batch_size, shuffle=train, drop_last=train,
                                               generator=torch.Generator().manual_seed(self.seed) if train else None)
    return OldDataModule


def child_train(a) -> dict:
    "Set up the data (old or new path), then `a.epochs` epochs of `a.steps` steps; seconds and images/s of each part."
    from cvops.config import load_config, set_process_defaults
    set_process_defaults()
    import warnings
    import lightning as L
    import torch
    from cvops.preprocess import PreprocessSpec
    from cvops.store import project_store
    from cvops.tasks import ImageClassifier, VersionDataModule
    from cvops.versions import load_version
    cfg = load_config()
    store = project_store(None, cfg)
    version = load_version(a.version, a.dataset, store=store, cfg=cfg)
    spec = PreprocessSpec(size=a.size)
    cls = _old_datamodule() if a.path == "old" else VersionDataModule
    dm = cls(version, store, spec, batch_size=a.batch_size, seed=0, cache_dir=cfg.home_dir / "cache" / "images")
    t0 = time.perf_counter(); dm.setup("fit"); setup_s = time.perf_counter() - t0
    n_train = len(version.split("train"))
    times = []
    class Clock(L.Callback):
        def on_train_epoch_start(self, *args): self.t = time.perf_counter()
        def on_train_epoch_end(self, *args): times.append(time.perf_counter() - self.t)
    module = ImageClassifier(a.backbone, tuple(version.classes), augment=True, mean=spec.mean, std=spec.std)
    trainer = L.Trainer(max_epochs=a.epochs, limit_train_batches=a.steps, limit_val_batches=0, logger=False,
                        callbacks=[Clock()], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", deterministic=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=dm)
    per_epoch = a.steps * a.batch_size
    return dict(setup_s=round(setup_s, 2), decode_images_per_s=round(n_train / setup_s, 1) if setup_s > 0.05 else None,
                first_epoch_images_per_s=round(per_epoch / (setup_s + times[0]), 1),  # data set-up belongs to the first epoch
                later_epochs_images_per_s=round(per_epoch * (len(times) - 1) / sum(times[1:]), 1) if len(times) > 1 else None,
                epoch_seconds=[round(t, 2) for t in times], peak_rss_mb=round(_rss_mb()))


def run_child(kind, env, **kw) -> dict:
    args = [sys.executable, __file__, "--child", kind] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    if r.returncode != 0: raise SystemExit(f"{kind} {kw} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", default="10000,50000", help="dataset sizes, comma-separated")
    ap.add_argument("--size", type=int, default=128, help="image side and model input size")
    ap.add_argument("--steps", type=int, default=10, help="training steps per epoch (the data path is measured)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--backbone", default="mobilenet_v3_small")
    ap.add_argument("--old-ingest-max", type=int, default=10000, help="largest n for the old (full-decode) ingest")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"))
    ap.add_argument("--child"); ap.add_argument("--path"); ap.add_argument("--src"); ap.add_argument("--dataset"); ap.add_argument("--version")
    a = ap.parse_args()
    if a.child:
        print(json.dumps({"ingest": child_ingest, "train": child_train}[a.child](a))); return
    from cvops.synth import generate
    work = Path(tempfile.mkdtemp(prefix="cvops-bench-scale-"))
    env = {**os.environ, "CVOPS_HOME": str(work / ".cvops"), "CVOPS_STORE_URL": str(work / "store"), "FIFTYONE_DO_NOT_TRACK": "true",
           "WANDB_MODE": "disabled", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    common = dict(size=a.size, steps=a.steps, epochs=a.epochs, batch_size=a.batch_size, backbone=a.backbone)
    results = []
    for n in map(int, a.n.split(",")):
        src = work / f"src-{n}"
        t0 = time.perf_counter(); generate(out=src, n=n, seed=n, size=a.size, progress=False)
        print(f"n={n}: generated in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        row = dict(n=n)
        if n <= a.old_ingest_max: row["ingest_old"] = run_child("ingest", env, path="old", src=src, dataset=f"old-{n}")
        row["ingest_new"] = run_child("ingest", env, path="new", src=src, dataset=f"s-{n}")
        version = row["ingest_new"]["version"]
        need = n * 3 * a.size ** 2 * 4
        if need < mem / 2: row["train_old"] = run_child("train", env, path="old", dataset=f"s-{n}", version=version, **common)
        else: row["train_old"] = dict(skipped=f"float32 tensor of {need / 2**30:.1f} GiB > half of {mem / 2**30:.0f} GiB")
        row["train_new_cold"] = run_child("train", env, path="new", dataset=f"s-{n}", version=version, **common)
        row["train_new_warm"] = run_child("train", env, path="new", dataset=f"s-{n}", version=version, **common)
        results.append(row)
        print(json.dumps(row), file=sys.stderr)
    g = lambda d, k: "-" if not isinstance(d, dict) or d.get(k) is None else d[k]
    print(f"\nscale benchmark: synthetic {a.size}px PNGs, {a.backbone}, batch {a.batch_size}, {a.steps} steps/epoch, "
          f"{a.epochs} epochs, CPU ({os.cpu_count()} cores, shared machine)")
    print(f"{'n':>7} {'measure':<34}{'old':>14}{'new (cold)':>14}{'new (warm)':>14}")
    for r in results:
        lines = [("ingest images/s", g(r.get("ingest_old"), "images_per_s"), g(r["ingest_new"], "images_per_s"), ""),
                 ("ingest peak RSS MB", g(r.get("ingest_old"), "peak_rss_mb"), g(r["ingest_new"], "peak_rss_mb"), ""),
                 ("train set-up s (decode)", g(r["train_old"], "setup_s"), g(r["train_new_cold"], "setup_s"), g(r["train_new_warm"], "setup_s")),
                 ("first epoch images/s", g(r["train_old"], "first_epoch_images_per_s"), g(r["train_new_cold"], "first_epoch_images_per_s"), g(r["train_new_warm"], "first_epoch_images_per_s")),
                 ("later epochs images/s", g(r["train_old"], "later_epochs_images_per_s"), g(r["train_new_cold"], "later_epochs_images_per_s"), g(r["train_new_warm"], "later_epochs_images_per_s")),
                 ("train peak RSS MB", g(r["train_old"], "peak_rss_mb"), g(r["train_new_cold"], "peak_rss_mb"), g(r["train_new_warm"], "peak_rss_mb"))]
        for label, *vals in lines: print(f"{r['n']:>7} {label:<34}" + "".join(f"{str(v):>14}" for v in vals))
        if "skipped" in r["train_old"]: print(f"{'':>7} old training skipped: {r['train_old']['skipped']}")
    rss = [r["train_new_warm"]["peak_rss_mb"] for r in results]
    if len(rss) > 1: print(f"new path peak RSS, largest ÷ smallest n: {max(rss) / min(rss):.2f}x (target ≤ 1.3x)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(params={k: v for k, v in vars(a).items() if k not in ("child", "path", "src", "dataset", "version")},
                                           results=results, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())), indent=2))
    print(f"wrote {a.out}")
    import shutil
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
