"""Training and evaluation on the real path: synthetic shapes → FiftyOne ingest (bundled mongod) → dataset version →
Lightning training with an offline W&B run → evaluation written back into FiftyOne, plus the CLI.

One temporary project for the module (mongod takes seconds to start). The long test is the demo-default training run
(≥ 90 % validation accuracy on a 2-core CPU, a few minutes); the determinism test uses tiny data and epochs."""
import os
import time

import pytest
import torch

from conftest import run_cli
from cvops.config import load_config
from cvops.errors import NotFoundError, ParameterError
from cvops.store import ArtifactStore
from cvops.synth import generate


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    "A throwaway project exported through CVOPS_* (CLI children share it), with 1200 shapes ingested and versioned."
    root = tmp_path_factory.mktemp("trainproj")
    env = {"CVOPS_HOME": str(root / ".cvops"), "CVOPS_STORE_URL": str(root / "store"), "FIFTYONE_DO_NOT_TRACK": "true",
           "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from cvops.data import create_version, ingest
    cfg = load_config()
    generate(out=root / "raw", n=1200, seed=0, size=64, progress=False)  # 300 per class
    report = ingest(root / "raw", cfg=cfg, progress=False)
    assert report.added == 1200, report
    version = create_version(cfg=cfg)
    yield dict(root=root, cfg=cfg, store=ArtifactStore(cfg.store_location), version=version)
    for k, v in old.items():
        if v is None: os.environ.pop(k, None)
        else: os.environ[k] = v


@pytest.fixture(scope="module")
def demo_run(project):
    "The demo defaults (resnet18, 64 px, AdamW + one-cycle, 8 epochs) on the 1200 shapes."
    from cvops.train import train
    t0 = time.perf_counter()
    run = train(dict(dataset_version=project["version"].id), cfg=project["cfg"], store=project["store"])
    run.__dict__["_wall"] = time.perf_counter() - t0
    return run


def test_demo_defaults_reach_90_percent(demo_run, project):
    v = project["version"]
    assert demo_run.metrics["val_accuracy"] >= 0.90, (demo_run.metrics, demo_run.history)
    assert demo_run.params["backbone"] == "resnet18" and demo_run.params["epochs"] == len(demo_run.history) == 8
    # the reproducibility record of contract C
    assert (demo_run.dataset, demo_run.dataset_version, demo_run.seed) == (v.dataset, v.id, 0)
    assert len(demo_run.git["commit"]) == 40 and isinstance(demo_run.git["dirty"], bool)
    assert demo_run.packages["torch"] and demo_run.packages["lightning"] and demo_run.hardware["cpu_count"] >= 1
    assert project["store"].has(demo_run.checkpoint)
    print(f"\ndemo run: val_accuracy {demo_run.metrics['val_accuracy']:.4f} in {demo_run.__dict__['_wall']:.0f} s, "
          f"{demo_run.metrics['train_images_per_s']} train img/s (last epoch)")


def test_wandb_offline_run_holds_config_and_history(demo_run):
    from cvops.train import read_wandb_run
    assert os.path.basename(demo_run.wandb_dir).startswith("offline-run-")
    wb = read_wandb_run(demo_run.wandb_dir)
    assert wb["id"] == demo_run.id
    assert wb["config"]["params"] == demo_run.params and wb["config"]["dataset_version"] == demo_run.dataset_version
    assert wb["config"]["git"] == demo_run.git
    logged = [h["val_accuracy"] for h in wb["history"] if "val_accuracy" in h]
    assert logged == pytest.approx([h["val_accuracy"] for h in demo_run.history], abs=1e-6)
    assert any("val_confusion_matrix_table" in k or "val_confusion_matrix" in k for h in wb["history"] for k in h), wb["history"][-1].keys()
    assert any("val_predictions" in k for h in wb["history"] for k in h)
    assert wb["summary"]["checkpoint"] == demo_run.checkpoint


def test_load_model_matches_recorded_accuracy(demo_run, project):
    from cvops.tasks import decode_split
    from cvops.train import load_model
    model, classes, spec = load_model(demo_run.id, project["store"])
    x, y, _ = decode_split(project["version"], "val", project["store"], spec, classes)
    with torch.inference_mode(): acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(demo_run.metrics["val_accuracy"], abs=1e-6)


def test_evaluation_goes_into_fiftyone(demo_run, project):
    import fiftyone as fo
    from cvops.data import open_dataset
    from cvops.evaluate import eval_key, evaluate, load_evaluation
    ev = evaluate(demo_run.id, project["version"].id, split="test", cfg=project["cfg"], store=project["store"])
    n_test = len(project["version"].split("test"))
    assert ev.n == n_test and sum(map(sum, ev.confusion)) == n_test
    assert ev.metrics["accuracy"] >= 0.85 and 0 <= ev.metrics["ece"] <= 1
    assert set(ev.metrics["per_class"]) == set(project["version"].classes)
    ds = open_dataset(cfg=project["cfg"])
    ds.reload()
    key = eval_key(demo_run.id)
    assert key in ds.list_evaluations() and ds.has_sample_field("predictions")
    results = ds.load_evaluation_results(key)  # FiftyOne itself reads the evaluation back
    assert results.metrics()["accuracy"] == pytest.approx(ev.metrics["accuracy"], abs=1e-9)
    view = ds.load_evaluation_view(key)
    assert len(view) == n_test
    pred = view.first().predictions
    assert pred.label in ev.classes and 0 < pred.confidence <= 1 and len(pred.logits) == len(ev.classes)
    wrong = n_test - sum(ev.confusion[i][i] for i in range(len(ev.classes)))
    assert len(view.match(fo.ViewField(key) == False)) == wrong  # per-sample correctness, for reviewing mistakes
    stored = load_evaluation(demo_run.id, project["version"].id, "test", cfg=project["cfg"], store=project["store"])
    assert stored.metrics == ev.metrics and stored.fiftyone["eval_key"] == key
    assert open(stored.plots["reliability"], "rb").read(4) == b"\x89PNG"


def test_same_seed_same_metrics(project):
    "Two tiny runs with the same inputs and seed agree exactly (CPU); another seed differs."
    from cvops.train import train
    args = dict(dataset_version=project["version"].id, backbone="resnet18", image_size=32, epochs=2, limit=64,
                batch_size=16, wandb="disabled")
    a, b, c = (train(dict(args, seed=s), cfg=project["cfg"], store=project["store"]) for s in (7, 7, 8))
    strip = lambda run: [{k: v for k, v in h.items() if k not in ("seconds", "train_images_per_s")} for h in run.history]
    assert strip(a) == strip(b) and a.metrics["val_loss"] == b.metrics["val_loss"]
    assert a.checkpoint == b.checkpoint  # bit-identical weights
    assert a.id != b.id
    assert strip(a) != strip(c) and a.checkpoint != c.checkpoint


def test_bad_inputs_list_what_exists(project):
    from cvops.train import train
    cfg, store, v = project["cfg"], project["store"], project["version"]
    with pytest.raises(NotFoundError, match=rf"no version of dataset 'shapes' named 'feedfacefeedface'; available: {v.id}"):
        train(dict(dataset_version="feedfacefeedface"), cfg=cfg, store=store)
    with pytest.raises(ParameterError, match=r"backbone: must be one of .*efficientnet_b0.*mobilenet_v3_small.*resnet18"):
        train(dict(dataset_version=v.id, backbone="resnet9"), cfg=cfg, store=store)
    with pytest.raises(ParameterError, match=r"lr must be float, got 'fast'"):
        train(dict(lr="fast"), cfg=cfg, store=store)
    r = run_cli("train", "--dataset-version", "feedfacefeedface")
    assert r.returncode == 1 and f"available: {v.id}" in r.stderr, r.stderr
    r = run_cli("train", "--backbone", "vgg99", "--epochs", "1")  # refused by the parameters: exit 2, before any work
    assert r.returncode == 2 and "backbone: must be one of" in r.stderr and "resnet18" in r.stderr, r.stderr
    r = run_cli("train", "--epochs", "two")
    assert r.returncode == 2 and "epochs must be int, got 'two' (from --epochs=two)" in r.stderr, r.stderr
    r = run_cli("evaluate", "no-such-run")
    assert r.returncode == 1 and "no run named 'no-such-run'; available:" in r.stderr, r.stderr


def test_cli_train_runs_and_evaluate(project):
    r = run_cli("train", "--dataset-version", project["version"].id, "--image-size", "32", "--epochs", "1", "--limit", "32",
                "--backbone", "mobilenet_v3_small", timeout=600)  # W&B offline: its messages must stay quiet too
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr  # quiet: no Lightning banners or tips, no W&B or pytree warnings on the terminal
    run_id = r.stdout.split()[1].rstrip(":")
    log_file = r.stdout.splitlines()[-1].removeprefix("log ")
    assert "GPU available" in open(log_file).read()  # they went to the run's log file
    r = run_cli("runs")
    assert r.returncode == 0 and run_id in r.stdout and "mobilenet_v3_small" in r.stdout, r.stdout
    r = run_cli("evaluate", run_id, "--split", "val", "--no-fiftyone", "--wandb", "disabled")
    assert r.returncode == 0 and f"run {run_id} on shapes@{project['version'].id}/val" in r.stdout, (r.stdout, r.stderr)
    from cvops.evaluate import load_evaluation
    ev = load_evaluation(run_id, project["version"].id, "val", cfg=project["cfg"], store=project["store"])
    assert f"accuracy {ev.metrics['accuracy']:.4f}" in r.stdout


@pytest.mark.parametrize("raw", [dict(accelerator="cpu", devices="2", strategy="ddp"),
                                 dict(accelerator="cpu", devices="2", strategy="ddp_spawn", precision="bf16-mixed"),
                                 dict(accelerator="cpu", devices="1", strategy="auto", num_nodes="1")])
def test_multi_device_options_build_a_trainer(raw):
    "What can be checked of multi-GPU on a CPU machine: Lightning accepts the strategy/devices options as cvops builds them."
    import lightning as L
    from cvops.config import validate_params
    from cvops.train import TrainParams, trainer_options
    opts = trainer_options(validate_params(TrainParams, raw), cuda=False)
    trainer = L.Trainer(**opts, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert trainer.num_devices == int(raw["devices"])
    assert type(trainer.strategy).__name__ == {"ddp": "DDPStrategy", "ddp_spawn": "DDPStrategy", "auto": "SingleDeviceStrategy"}[raw["strategy"]]
    if raw.get("precision"): assert trainer.precision == raw["precision"]


def test_cli_ddp_two_processes(project):
    "`cvops train --strategy ddp --devices 2 --accelerator cpu`: two gloo processes, rank 0 alone reports and records."
    store = project["store"]
    runs_before = set(store.list_docs("runs"))
    blobs = lambda: {p.name for p in (project["root"] / "store" / "objects").rglob("*") if p.is_file()}
    blobs_before = blobs()
    r = run_cli("train", "--dataset-version", project["version"].id, "--strategy", "ddp", "--devices", "2",
                "--accelerator", "cpu", "--image-size", "32", "--epochs", "1", "--limit", "32", "--batch-size", "8",
                "--backbone", "mobilenet_v3_small", "--wandb", "disabled", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and r.stderr == "", r.stderr  # no rank fails or talks, not even after the fit
    assert sum(l.startswith("run ") for l in r.stdout.splitlines()) == 1, r.stdout  # rank 1 prints nothing
    new = set(store.list_docs("runs")) - runs_before
    assert len(new) == 1, new
    from cvops.train import TrainRun
    run = TrainRun(**store.read_json(new.pop()))
    assert run.world_size == 2 and run.metrics["epochs"] == 1, run
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy"} <= set(run.metrics), run.metrics
    assert blobs() - blobs_before == {run.checkpoint}  # one checkpoint, written once (by rank 0)
