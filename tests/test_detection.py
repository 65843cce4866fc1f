"""Object detection on the real path (issue 17): synthetic shapes with boxes → COCO ingest (bundled mongod) → a
detection dataset version → a detector trained with Lightning → FiftyOne's COCO evaluation with TP/FP/FN per object.

One throwaway project for the module; tiny data (160 images, 64 px, 1–3 objects) and a few epochs: the module's tests
take about 2.5 minutes on a busy 2-core CPU, the pipeline test (its own project, 60 images at 32 px, papermill
kernels) about 2.5 more. The 15-minute accuracy measurement is bench/detection.py, not a test."""
import json
import math
import os

import numpy as np
import pytest

from cvops.config import load_config
from cvops.errors import ParameterError
from cvops.store import ArtifactStore
from cvops.synth import generate_detection

N = 160


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    "A throwaway project (CVOPS_* in the environment) with N synthetic detection images ingested from COCO JSON."
    root = tmp_path_factory.mktemp("detproj")
    env = {"CVOPS_HOME": str(root / ".cvops"), "CVOPS_STORE_URL": str(root / "store"), "FIFTYONE_DO_NOT_TRACK": "true",
           "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from cvops.data import ingest
    cfg = load_config(image_size=64)
    generate_detection(out=root / "coco", n=N, seed=0, size=64, objects_max=3, object_min=0.25, object_max=0.5, progress=False)
    report = ingest(root / "coco" / "annotations.json", cfg=cfg, progress=False)
    assert report.added == N, report
    yield dict(root=root, cfg=cfg, store=ArtifactStore(cfg.store_location),
               coco=json.loads((root / "coco" / "annotations.json").read_text()))
    for k, v in old.items():
        if v is None: os.environ.pop(k, None)
        else: os.environ[k] = v


@pytest.fixture(scope="module")
def version(project):
    from cvops.versions import create_version
    return create_version(cfg=project["cfg"], store=project["store"], task="detection")


@pytest.fixture(scope="module")
def run(project, version):
    from cvops.train import train
    return train(dict(task="detection", detector="fcos_tiny_fpn", epochs=4, batch_size=16, lr=3e-3, image_size=64,
                      dataset_version=version.id), cfg=project["cfg"], store=project["store"])


def test_boxes_land_in_a_content_addressed_version(project, version):
    from cvops.versions import create_version, load_version, verify_version
    coco = project["coco"]
    assert version.task == "detection"
    assert sum(len(s.detections) for s in version.samples) == len(coco["annotations"]) == sum(sum(c.values()) for c in version.counts.values())
    assert version.classes == sorted({c["name"] for c in coco["categories"]})
    # each COCO box (pixels of the 64 px image) is in the version, relative
    want = sorted(tuple(round(v / 64, 4) for v in a["bbox"]) for a in coco["annotations"])
    got = sorted(tuple(round(v, 4) for v in d["bbox"]) for s in version.samples for d in s.detections)
    assert got == want
    again = create_version(cfg=project["cfg"], store=project["store"], task="detection")
    assert (again.id, again.sha256) == (version.id, version.sha256)
    assert load_version(version.id, store=project["store"], cfg=project["cfg"]).samples == version.samples
    assert verify_version(version, project["store"]) == N
    # the same samples as a classification version (COCO's dominant label per image): another id, no boxes
    cls = create_version(cfg=project["cfg"], store=project["store"])
    assert cls.task == "classification" and cls.id != version.id and all(s.detections is None for s in cls.samples)


def test_detector_trains_and_records_the_run(project, version, run):
    import torch
    from cvops.train import load_model, load_run
    assert run.task == "detection" and run.backbone == "fcos_tiny_fpn" and run.params["detector"] == "fcos_tiny_fpn"
    assert run.dataset_version == version.id and run.classes == version.classes
    losses = [r["train_loss"] for r in run.history]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    assert run.metrics["val_map50"] > 0.05, run.metrics  # an untrained detector scores ~0
    assert run.metrics["train_images_per_s"] > 0 and run.wandb_dir and os.path.isdir(run.wandb_dir)
    assert load_run(run.id, project["store"]).checkpoint == run.checkpoint
    model, classes, spec = load_model(run.id, project["store"])
    assert classes == version.classes and spec.size == 64
    out = model([torch.zeros(3, 64, 64)])[0]
    assert set(out) == {"boxes", "scores", "labels"} and out["boxes"].shape[-1] == 4
    assert not len(out["labels"]) or (out["labels"].min() >= 1 and out["labels"].max() <= len(classes))


def test_same_seed_same_detector(project, version):
    "Reproducible as classification: same version, parameters and seed give the same losses and mAP on the CPU."
    from cvops.train import train
    p = dict(task="detection", epochs=1, batch_size=16, image_size=64, limit=48, wandb="disabled", dataset_version=version.id)
    a, b = (train(p, cfg=project["cfg"], store=project["store"]) for _ in range(2))
    keys = ("train_loss", "val_map50")
    assert [{k: r[k] for k in keys} for r in a.history] == [{k: r[k] for k in keys} for r in b.history]
    assert a.checkpoint == b.checkpoint  # the same weights, byte for byte

def test_fiftyone_evaluation_with_tp_fp_fn_per_object(project, version, run):
    from cvops.data import open_dataset, version_view
    from cvops.evaluate import DETECTION_FIELD, eval_key, evaluate, load_evaluation
    ev = evaluate(run.id, version.id, split="test", cfg=project["cfg"], store=project["store"], wandb="disabled")
    m = ev.metrics
    assert 0 <= m["map"] <= m["map50"] <= 1 and set(m["per_class_ap"]) <= set(version.classes), m
    n_gt = sum(len(s.detections) for s in version.split("test"))
    assert m["tp"] + m["fn"] == n_gt and m["tp"] > 0, m
    c = m["confident"]  # only predictions scored ≥ 0.5: fewer hits and far fewer false positives
    assert c["tp"] + c["fn"] == n_gt and c["tp"] <= m["tp"] and c["fp"] <= m["fp"], c
    key = eval_key(run.id)
    ds = open_dataset(cfg=project["cfg"])
    view = version_view(version, cfg=project["cfg"])
    test = view.match({"split": "test"})
    assert test.sum(f"{key}_tp") == m["tp"] and test.sum(f"{key}_fp") == m["fp"] and test.sum(f"{key}_fn") == m["fn"]
    verdicts = test.values(f"{DETECTION_FIELD}.detections.{key}", unwind=True)
    assert set(verdicts) <= {"tp", "fp"} and verdicts.count("tp") == m["tp"]
    assert set(test.values(f"ground_truth_detections.detections.{key}", unwind=True)) <= {"tp", "fn"}
    results = ds.load_evaluation_results(key)  # the evaluation run loads back
    assert abs(results.mAP() - m["map"]) < 1e-9
    back = load_evaluation(run.id, version.id, "test", store=project["store"], cfg=project["cfg"])
    assert back.metrics == m and open(back.plots["pr_curves"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs_fail_first(project, version):
    from cvops.config import validate_params
    from cvops.evaluate import evaluate
    from cvops.train import TrainParams, train
    with pytest.raises(ParameterError, match="detector: must be one of .*fcos_tiny_fpn"):
        validate_params(TrainParams, {"task": "detection", "detector": "yolo99"})
    from cvops.versions import list_versions
    cls = next(v for v in list_versions(cfg=project["cfg"], store=project["store"]) if v.task == "classification")
    with pytest.raises(ParameterError, match="needs a detection dataset version"):
        train(dict(task="detection", dataset_version=cls.id), cfg=project["cfg"], store=project["store"])
    with pytest.raises(ParameterError, match="needs a classification dataset version"):
        train(dict(dataset_version=version.id), cfg=project["cfg"], store=project["store"])


def test_pipeline_task_detection_runs_ingest_to_gate(tmp_path):
    "`cvops run -p task=detection`: synthetic boxes → detection version → detector → COCO evaluation → gate on map."
    from conftest import ROOT, run_cli
    proj = tmp_path / "proj"; proj.mkdir()
    (proj / "cvops.yaml").write_text(f"stages_dir: {ROOT / 'nbs' / 'stages'}\nimage_size: 32\n")
    r = run_cli("run", "--stages", "ingest:gate", "-p", "task=detection", "-p", "synth_n=60", "-p", "epochs=1",
                "-p", "min_value=0", cwd=proj, timeout=900, env={"CVOPS_HOME": str(proj / ".cvops"), "CVOPS_STORE_URL": str(proj / "store")})
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads(sorted((proj / ".cvops" / "runs").glob("*/manifest.json"))[-1].read_text())
    assert [s["name"] for s in m["stages"]] == ["ingest", "curate", "train", "evaluate", "gate"]
    assert all(s["status"] == "ok" for s in m["stages"]), m["stages"]
    out = {s["name"]: s.get("outputs", {}) for s in m["stages"]}
    assert out["curate"]["task"] == "detection" and out["train"]["task"] == "detection"
    assert 0 <= out["evaluate"]["map"] <= out["evaluate"]["map50"] <= 1
    assert out["gate"]["metric"] == "map" and out["gate"]["challenger_value"] == out["evaluate"]["map"]
