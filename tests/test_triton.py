"""The real `tritonserver` (from nvidia-pytriton, in cvops' own Triton env) serving a generated python-variant
repository on loopback: predictions through tritonclient HTTP and gRPC must equal ONNX Runtime in-process (values,
not shapes: the Python backend answers with empty outputs under numpy 2, SPEC §8); the generated configs of every
variant parse as Triton's ModelConfig; the server is stopped by PID and leaves no process behind.

The Triton env is created on first use (≈30 s) under the project's `.cvops/triton-env` (or `CVOPS_TRITON_ENV`) and
reused afterwards."""
import json
import os
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from cvops.bundle import ModelBundle
from cvops.errors import CvopsError, ParameterError
from cvops.triton import (TritonServer, build_repository, default_triton_env_dir, ensure_triton_env,
                          triton_infer)

CLASSES = ["circle", "square", "star", "triangle"]
SIZE = 32
NAME = "shapes"


def _gone(pid: int) -> bool:
    "True when no process has this PID any more and none is left in its process group."
    try:
        os.kill(pid, 0)
        return False
    except ProcessLookupError:
        pass
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pid and fields[0] != "Z":  # fields[2] is the process group id
            return False
    return True


@pytest.fixture(scope="session")
def triton_env():
    "cvops' Triton env: created once (file-locked, so parallel sessions share it), then reused."
    return ensure_triton_env()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    "A contract-D bundle written by cvops.export from a tiny randomly initialised torch CNN."
    import torch
    from torch import nn

    from cvops.export import export_bundle
    from cvops.preprocess import PreprocessSpec

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, len(CLASSES))).eval()
    inputs = np.random.default_rng(1).normal(size=(8, 3, SIZE, SIZE)).astype(np.float32)
    out, parity = export_bundle(model, CLASSES, PreprocessSpec(size=SIZE), tmp_path_factory.mktemp("b") / "bundle",
                               inputs, name=NAME)
    assert parity.passed, parity
    return out


@pytest.fixture(scope="module")
def reference(bundle):
    "ONNX Runtime in-process on the bundle's model.onnx: the values Triton must reproduce."
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    return lambda x: sess.run(["logits"], {"input": x})[0]


@pytest.fixture(scope="module")
def server(bundle, triton_env, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    build_repository(bundle, repo, NAME, 1, "python",
                     batching={"max_batch_size": 8, "preferred_batch_sizes": [4, 8], "max_queue_delay_us": 500})
    # a second model whose batcher waits long enough that concurrent requests are sure to be grouped
    build_repository(bundle, repo, "batched", 1, "python",
                     batching={"max_batch_size": 8, "preferred_batch_sizes": [8], "max_queue_delay_us": 300_000})
    srv = TritonServer(repo, env=triton_env, log_file=tmp_path_factory.mktemp("log") / "triton.log")
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, SIZE, SIZE)).astype(np.float32)


def test_env_has_numpy_1_and_is_reused(triton_env):
    out = subprocess.run([str(triton_env.python), "-c", "import numpy, onnxruntime; print(numpy.__version__)"],
                         capture_output=True, text=True, check=True)
    assert int(out.stdout.split(".")[0]) < 2, out.stdout  # numpy 2 makes the Python backend answer empty
    assert triton_env.tritonserver.is_file() and os.access(triton_env.tritonserver, os.X_OK)
    assert (triton_env.backend_dir / "python" / "triton_python_backend_stub").is_file()
    t0 = time.monotonic()
    again = ensure_triton_env(triton_env.path)  # stamp present: no reinstall
    assert again == triton_env and time.monotonic() - t0 < 15
    assert json.loads((triton_env.path / ".cvops-triton-env.json").read_text())["requirements"][0].startswith("nvidia-pytriton")


def test_env_creation_failure_is_clear(tmp_path):
    with pytest.raises(CvopsError, match="could not create the Triton env") as err:
        ensure_triton_env(tmp_path / "env", python=tmp_path / "no-such-python")
    assert "no-such-python" in str(err.value) and (tmp_path / "env.log").is_file()
    precious = tmp_path / "not-an-env"
    precious.mkdir()
    (precious / "keep.txt").write_text("user data")
    with pytest.raises(CvopsError, match="is not a virtual environment"):
        ensure_triton_env(precious)
    assert (precious / "keep.txt").read_text() == "user data"  # never deleted to make room for an env


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_predictions_match_onnxruntime(server, reference, protocol):
    x = batch(5, seed=3)
    url = server.http_url if protocol == "http" else server.grpc_url
    got = triton_infer(url, NAME, x, protocol=protocol)
    want = reference(x)
    assert got.shape == (5, len(CLASSES)) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want).max() > 1e-3  # the reference itself is not trivially zero
    assert (got.argmax(1) == want.argmax(1)).all()


def test_clients_and_labels(server, reference):
    "Raw tritonclient calls on both protocols, and class names from labels.txt through the classification extension."
    x = batch(3, seed=4)
    want = reference(x)
    for mod, url in ((httpclient, server.http_url), (grpcclient, server.grpc_url)):
        client = mod.InferenceServerClient(url)
        try:
            assert client.is_model_ready(NAME)
            inp = mod.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            res = client.infer(NAME, [inp], outputs=[mod.InferRequestedOutput("logits", class_count=2)])
            top = res.as_numpy("logits")  # rows of b"score:index:label"
        finally:
            client.close()
        for row, logits in zip(top, want):
            labels = [e.decode().split(":")[2] for e in row]
            assert labels == [CLASSES[i] for i in np.argsort(-logits)[:2]]
            assert float(row[0].decode().split(":")[0]) == pytest.approx(logits.max(), abs=1e-4)


def test_concurrent_requests_are_batched(server, reference):
    "Concurrent single-image requests are grouped by the dynamic batcher; model.py splits the results correctly."
    xs = [batch(1, seed=100 + i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda x: triton_infer(server.http_url, "batched", x), xs))
    for x, g in zip(xs, got):
        np.testing.assert_allclose(g, reference(x), rtol=1e-5, atol=1e-5)
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        stats = client.get_inference_statistics("batched")["model_stats"][0]
    finally:
        client.close()
    assert stats["inference_count"] == 8
    assert stats["execution_count"] < 8, stats  # at least two requests ran as one batch


def test_live_config_matches_generated(server, bundle):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        cfg = client.get_model_config(NAME).config
    finally:
        client.close()
    assert (cfg.backend, cfg.max_batch_size) == ("python", 8)
    assert [(t.name, list(t.dims)) for t in cfg.input] == [("input", [3, SIZE, SIZE])]
    assert [(t.name, list(t.dims), t.label_filename) for t in cfg.output] == [("logits", [len(CLASSES)], "labels.txt")]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in cfg.instance_group] == [(1, "KIND_CPU")]


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_configs_of_every_variant(bundle, tmp_path):
    repo = tmp_path / "repo"
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"not a real engine: only the repository layout is checked here")
    batching = {"max_batch_size": 64, "preferred_batch_sizes": [16, 64], "max_queue_delay_us": 1000}
    build_repository(bundle, repo, "ort", 1, "onnxruntime", batching=batching, instances={"count": 2})
    build_repository(bundle, repo, "trt", 3, "tensorrt", batching=batching, plan=plan)
    build_repository(bundle, repo, "ort-trt", 1, "onnxruntime-trt", batching=batching,
                     accelerator={"precision_mode": "FP16", "engine_cache_path": "/var/cache/trt"})
    build_repository(bundle, repo, "py", 1, "python", batching={"max_batch_size": 0})

    files = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
    for name, version, model_file in (("ort", 1, "model.onnx"), ("trt", 3, "model.plan"), ("ort-trt", 1, "model.onnx"),
                                      ("py", 1, "model.py")):
        assert {f"{name}/config.pbtxt", f"{name}/labels.txt", f"{name}/{version}/{model_file}"} <= set(files)
        assert (repo / name / "labels.txt").read_text().split() == CLASSES
    assert (repo / "trt/3/model.plan").read_bytes() == plan.read_bytes()
    assert (repo / "py/1/model.onnx").read_bytes() == (bundle / "model.onnx").read_bytes()

    ort_cfg, trt_cfg, acc_cfg, py_cfg = (parse(repo / n / "config.pbtxt") for n in ("ort", "trt", "ort-trt", "py"))
    kind = model_config_pb2.ModelInstanceGroup.Kind.Name
    assert (ort_cfg.platform, ort_cfg.default_model_filename, ort_cfg.max_batch_size) == ("onnxruntime_onnx", "model.onnx", 64)
    assert list(ort_cfg.dynamic_batching.preferred_batch_size) == [16, 64]
    assert ort_cfg.dynamic_batching.max_queue_delay_microseconds == 1000
    assert [(g.count, kind(g.kind)) for g in ort_cfg.instance_group] == [(2, "KIND_GPU")]
    assert list(ort_cfg.input[0].dims) == [3, SIZE, SIZE] and list(ort_cfg.output[0].dims) == [len(CLASSES)]
    assert (trt_cfg.platform, trt_cfg.default_model_filename) == ("tensorrt_plan", "model.plan")
    assert not ort_cfg.HasField("optimization")
    (acc,) = acc_cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt"
    assert dict(acc.parameters) == {"precision_mode": "FP16", "max_workspace_size_bytes": str(1 << 30),
                                    "trt_engine_cache_enable": "true", "trt_engine_cache_path": "/var/cache/trt"}
    assert (py_cfg.backend, py_cfg.max_batch_size, list(py_cfg.input[0].dims)) == ("python", 0, [-1, 3, SIZE, SIZE])
    assert not py_cfg.HasField("dynamic_batching") and kind(py_cfg.instance_group[0].kind) == "KIND_CPU"


def test_bad_parameters_are_refused(bundle, tmp_path):
    with pytest.raises(ParameterError, match=r"preferred_batch_sizes must lie in 1..max_batch_size=4, got \[8\]"):
        build_repository(bundle, tmp_path, "m", batching={"max_batch_size": 4, "preferred_batch_sizes": [2, 8]})
    with pytest.raises(ParameterError, match="runs on a GPU only"):
        build_repository(bundle, tmp_path, "m", variant="onnxruntime-trt", instances={"kind": "cpu"})
    with pytest.raises(ParameterError, match="needs a TensorRT engine file"):
        build_repository(bundle, tmp_path, "m", variant="tensorrt")
    with pytest.raises(ParameterError, match="invalid model name"):
        build_repository(bundle, tmp_path, "../escape")
    with pytest.raises(ParameterError, match="variant must be one of"):
        build_repository(bundle, tmp_path, "m", variant="pytorch")
    assert not (tmp_path / "m").exists()
    assert ModelBundle.load(bundle).input.dims == [3, SIZE, SIZE]


def test_stop_by_pid_leaves_nothing(bundle, triton_env, tmp_path):
    build_repository(bundle, tmp_path / "repo", NAME)
    with TritonServer(tmp_path / "repo", env=triton_env, log_file=tmp_path / "t.log", metrics=True) as srv:
        pid = srv.pid
        assert srv.is_ready() and not _gone(pid)
        assert np.isfinite(triton_infer(srv.grpc_url, NAME, batch(1), protocol="grpc")).all()
        assert srv.metrics_url.startswith("http://127.0.0.1:")
        want = f'nv_inference_request_success{{model="{NAME}",version="1"}} 1'
        for _ in range(50):  # Triton counts a request just after answering it
            with urllib.request.urlopen(srv.metrics_url, timeout=5) as r:
                metrics = r.read().decode()
            if want in metrics:
                break
            time.sleep(0.1)
        assert want in metrics, metrics[:2000]
        urls = (srv.http_url, srv.grpc_url)
        srv.restart()  # same ports, new process: clients keep their URLs
        assert (srv.http_url, srv.grpc_url) == urls and srv.pid != pid and _gone(pid)
        pid = srv.pid
        assert np.isfinite(triton_infer(srv.http_url, NAME, batch(1))).all()
    assert srv.pid is None and not srv.is_running()
    deadline = time.monotonic() + 5
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(pid), f"tritonserver {pid} or a process of its group is still running"
    assert srv.last_pid == pid


def test_broken_model_fails_with_log_tail(bundle, triton_env, tmp_path):
    build_repository(bundle, tmp_path / "repo", NAME)
    (tmp_path / "repo" / NAME / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    srv = TritonServer(tmp_path / "repo", env=triton_env, log_file=tmp_path / "t.log", ready_timeout=60)
    with pytest.raises(CvopsError, match="tritonserver did not become ready") as err:
        srv.start()
    msg = str(err.value)
    assert "t.log" in msg and f"failed to load '{NAME}'" in msg and "INVALID_PROTOBUF" in msg, msg  # the cause, from the log
    assert srv.pid is None and not srv.is_running() and _gone(srv.last_pid)
    # explicit control mode loads only the models named: the broken one stays out of the way
    build_repository(bundle, tmp_path / "repo", "good")
    with TritonServer(tmp_path / "repo", env=triton_env, log_file=tmp_path / "t2.log", control_mode="explicit",
                      models=["good"]) as srv:
        client = httpclient.InferenceServerClient(srv.http_url)
        try:
            index = {m["name"]: m.get("state") for m in client.get_model_repository_index()}
        finally:
            client.close()
        assert index == {"good": "READY", NAME: None}, index
        assert np.isfinite(triton_infer(srv.http_url, "good", batch(2))).all()
