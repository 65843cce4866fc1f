"""ONNX export of a real torchvision model: the bundle, its parity with PyTorch, a tampered model failing parity
with the measured error, and the gate refusing a worse challenger with both metrics in its reason."""
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision

from cvops.errors import ParityError
from cvops.bundle import ModelBundle
from cvops.export import check_parity, export_bundle, tensorrt_status
from cvops.preprocess import PreprocessSpec
from cvops.registry import Candidate, GatePolicy, decide


@pytest.fixture(scope="module")
def model_and_inputs():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    x = np.random.default_rng(0).normal(size=(8, 3, 48, 48)).astype(np.float32)
    return model, x


def test_bundle_is_complete_and_matches_pytorch(model_and_inputs, tmp_path):
    model, x = model_and_inputs
    bundle, parity = export_bundle(model, ["circle", "square", "star", "triangle"], PreprocessSpec(size=48),
                                  tmp_path / "bundle", x, tolerance=1e-4)
    assert sorted(p.name for p in bundle.iterdir()) == ["labels.txt", "model.json", "model.onnx", "preprocess.json"]
    b = ModelBundle.load(bundle)  # what export writes, the one bundle reader accepts
    assert b.classes == ("circle", "square", "star", "triangle") and b.input.dims == [3, 48, 48] and b.output.dims == [4]
    assert parity.passed and parity.max_abs_diff < 1e-4 and parity.top1_agreement == 1.0 and parity.n == 8
    graph = onnx.load(str(bundle / "model.onnx")).graph
    assert graph.input[0].name == "input" and graph.output[0].name == "logits"
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param, "the batch axis must be dynamic"
    import onnxruntime as ort
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 3, 17):  # any batch size runs
        assert sess.run(None, {"input": np.repeat(x[:1], n, 0)})[0].shape == (n, 4)


def test_tampered_weights_fail_parity_with_the_measured_error(model_and_inputs, tmp_path):
    model, x = model_and_inputs
    bundle, _ = export_bundle(model, list("abcd"), PreprocessSpec(size=48), tmp_path / "bundle", x)
    m = onnx.load(str(bundle / "model.onnx"))
    w = [t for t in m.graph.initializer if len(t.dims) == 2][-1]  # the classifier's weights
    w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w) * 1.05, w.name))
    onnx.save(m, str(tmp_path / "tampered.onnx"))
    p = check_parity(tmp_path / "tampered.onnx", model, x, tolerance=1e-4)
    assert not p.passed and p.max_abs_diff > 1e-3, p


def test_export_past_tolerance_fails_loudly_and_leaves_nothing(model_and_inputs, tmp_path):
    model, x = model_and_inputs
    with pytest.raises(ParityError, match=r"ONNX Runtime differs from PyTorch by [0-9.e-]+ \(max abs logit difference over 8 images; tolerance 1e-12"):
        export_bundle(model, list("abcd"), PreprocessSpec(size=48), tmp_path / "bundle", x, tolerance=1e-12)
    assert not (tmp_path / "bundle").exists() and not list(tmp_path.glob(".bundle-*"))


def test_worse_challenger_is_refused_naming_both_metrics():
    champion = Candidate(version=3, dataset_version="d1", split="test", metrics={"accuracy": 0.94, "macro_f1": 0.93})
    worse = Candidate(version=4, dataset_version="d1", split="test", metrics={"accuracy": 0.91, "macro_f1": 0.95})
    d = decide(champion, worse, GatePolicy(metric="accuracy"))
    assert not d.promote
    assert "challenger accuracy=0.9100" in d.reason and "champion accuracy=0.9400" in d.reason
    assert decide(champion, worse, GatePolicy(metric="macro_f1")).promote
    assert not decide(champion, worse, GatePolicy(metric="macro_f1", margin=0.05)).promote


@pytest.mark.skipif(not tensorrt_status()[0], reason=tensorrt_status()[1])
def test_tensorrt_engine_matches_onnxruntime(model_and_inputs, tmp_path):
    from cvops.export import build_tensorrt_engine, tensorrt_parity
    model, x = model_and_inputs
    bundle, _ = export_bundle(model, list("abcd"), PreprocessSpec(size=48), tmp_path / "bundle", x)
    engine = build_tensorrt_engine(bundle / "model.onnx", bundle / "model.plan", 48, max_batch=16, opt_batch=8)
    assert tensorrt_parity(engine, bundle / "model.onnx", x).passed
