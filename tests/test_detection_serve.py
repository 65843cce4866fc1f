"""Detection from export to the gateway: a torchvision detector (built as the detection contract says, trained a few
steps on shapes drawn with PIL) exported by cvops.export_detection, parity on boxes (and a tampered export failing it),
and a real `cvops serve` process answering boxes equal to in-process ONNX Runtime, beside a classifier."""
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from conftest import run_cli  # noqa: E402
from detection_helpers import CLASSES, draw_scene, train_detector  # noqa: E402
from serve_helpers import Gateway, encode, make_bundle, make_images  # noqa: E402
from test_serve import BAD  # noqa: E402  the classification gateway's bad inputs, replayed against a detector

KEY = "test-key-0123456789"
ALL = {"score_threshold": 0, "max_detections": 1000}  # every detection the graph returns


@pytest.fixture(scope="module")
def det(tmp_path_factory):
    "A trained detector, its bundle, a classifier bundle, and test photos (drawn scenes, one not square and larger)."
    from cvops.export_detection import export_detector
    from cvops.preprocess import preprocess_bytes
    root = tmp_path_factory.mktemp("det")
    model, spec = train_detector()
    rng = np.random.default_rng(1)
    photos = [encode(draw_scene(rng, 64)[0], "PNG") for _ in range(6)]
    photos.append(encode(draw_scene(rng, 64)[0].resize((160, 96)), "JPEG", quality=95))  # boxes must scale per axis
    exif = Image.Exif(); exif[0x0112] = 6  # stored sideways (displayed 96 × 160): boxes are in pixels of the upright photo
    photos.append(encode(draw_scene(rng, 64)[0].resize((160, 96)), "JPEG", quality=95, exif=exif))
    x = np.stack([preprocess_bytes(p, spec) for p in photos])
    bundle, parity = export_detector(model, CLASSES, spec, root / "det", x, name="shapes-det", min_score=0.06,
                                     detector_name="fasterrcnn_mobilenet_v3_large_320_fpn")
    cls = make_bundle(root / "cls", make_images(root / "images", n=16))
    return dict(root=root, model=model, spec=spec, photos=photos, inputs=x, bundle=bundle, parity=parity, cls=cls)


@pytest.fixture(scope="module")
def gw(det):
    root = det["root"]
    (root / "serve.yaml").write_text(f"models:\n  - {{name: det, model_dir: {det['bundle']}}}\n  - {{name: cls, model_dir: {det['cls']}}}\n")
    with Gateway("--config", root / "serve.yaml", "--capture-rate", 1, "--capture-url", root / "store", "--max-body-mb", 2,
                 "--max-pixels", 4_000_000, env={"CVOPS_API_KEY": KEY, "CVOPS_HOME": str(root / "home")},
                 cwd=root, log=root / "gateway.log") as g:
        g.store = root / "store"
        yield g


def client(g):
    return httpx.Client(base_url=g.url, headers={"X-API-Key": KEY}, timeout=60)


def expected(bundle: Path, data: bytes, threshold: float = 0.0, most: int = 1000) -> list[dict]:
    "In-process ONNX Runtime through the shared decode path, boxes scaled to the photo's pixels (written out here, not reused from cvops)."
    from PIL import Image, ImageOps
    import io
    from cvops.bundle import ModelBundle, ort_session
    from cvops.preprocess import decode_resized, normalize
    b = ModelBundle.load(bundle)
    boxes, scores, labels = ort_session(b.onnx_path).run(["boxes", "scores", "labels"],
                                                         {"input": normalize(decode_resized(data, b.spec), b.spec)[None]})
    w, h = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size  # the photo as displayed (EXIF orientation applied)
    s = b.spec.size
    out = [{"label": CLASSES[l - 1], "score": float(sc), "box": [x1 * w / s, y1 * h / s, x2 * w / s, y2 * h / s]}
           for (x1, y1, x2, y2), sc, l in zip(boxes.tolist(), scores, labels) if sc >= threshold]
    return sorted(out, key=lambda d: -d["score"])[:most]


def assert_boxes(got: list[dict], want: list[dict]):
    assert [d["label"] for d in got] == [d["label"] for d in want], (got, want)
    np.testing.assert_allclose([d["score"] for d in got], [d["score"] for d in want], atol=1e-5)
    np.testing.assert_allclose(np.reshape([d["box"] for d in got], (-1, 4)), np.reshape([d["box"] for d in want], (-1, 4)), atol=1e-3)


def test_parity_passes_and_a_tampered_export_fails(det, tmp_path):
    from cvops.bundle import ModelBundle
    from cvops.export_detection import check_detection_parity
    p = det["parity"]
    assert p.passed and p.detections > 0 and p.unmatched == 0 and p.min_iou >= 0.99, p
    b = ModelBundle.load(det["bundle"])
    assert (b.task, b.meta["parity"]["passed"], [o.name for o in b.outputs]) == ("detection", True, ["boxes", "scores", "labels"])
    m = onnx.load(b.onnx_path)
    w = next(t for t in m.graph.initializer if t.name.endswith("box_predictor.cls_score.weight"))
    w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w) * np.float32(1.05), w.name))
    onnx.save(m, tmp_path / "tampered.onnx")
    bad = check_detection_parity(tmp_path / "tampered.onnx", det["model"], det["inputs"], min_score=0.06)
    assert not bad.passed and (bad.unmatched or bad.max_score_diff > bad.score_tolerance), bad


def test_gateway_boxes_equal_in_process_onnxruntime(gw, det):
    with client(gw) as c:
        n = 0
        for data in det["photos"]:
            want = expected(det["bundle"], data)
            r = c.post("/v1/predict", params=ALL, content=data, headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"]["name"] == "det" and "predictions" not in body
            assert_boxes(body["detections"], want); n += len(want)
            for d in body["detections"]:  # relative [x, y, w, h] agrees with the pixel box
                x, y, bw, bh = d["box_normalized"]
                assert 0 <= x <= 1 and 0 <= y <= 1 and bw >= 0 and bh >= 0
            top = c.post("/v1/predict", params={"score_threshold": 0.07, "max_detections": 2}, content=data).json()["detections"]
            assert_boxes(top, expected(det["bundle"], data, 0.07, 2))
        assert n > 0  # the detector found something to compare
        big = det["photos"][-2]
        d = c.post("/v1/predict", params=ALL, content=big).json()["detections"]
        if d: assert max(b["box"][2] for b in d) > 64  # in pixels of the 160×96 photo, not of the 64×64 input
        turned = c.post("/v1/predict", params=ALL, content=det["photos"][-1]).json()["detections"]
        assert all(b["box"][2] <= 96.001 and b["box"][3] <= 160.001 for b in turned), turned  # upright: 96 wide, 160 high
        batch = c.post("/v1/predict/batch", params=ALL, files=[("files", (f"{i}.png", p, "image/png")) for i, p in enumerate(det["photos"][:3])]).json()
        for got, data in zip(batch["results"], det["photos"]): assert_boxes(got["detections"], expected(det["bundle"], data))


def test_composite_classifier_and_detector_equal_the_separate_answers(gw, det):
    with client(gw) as c:
        models = {m["name"]: m for m in c.get("/v1/models").json()}
        assert (models["det"]["task"], models["cls"]["task"]) == ("detection", "classification"), models
        for data in det["photos"][:3] + det["photos"][-1:]:
            comp = c.post("/v1/composite", params={"models": "det,cls", **ALL}, content=data).json()["results"]
            alone_det = c.post("/v1/models/det/predict", params=ALL, content=data).json()
            alone_cls = c.post("/v1/models/cls/predict", content=data).json()
            assert comp["det"]["detections"] == alone_det["detections"] and comp["cls"]["predictions"] == alone_cls["predictions"]


@pytest.mark.parametrize("name, route, kw, status, needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_on_a_detector_is_the_classifier_s_4xx(gw, name, route, kw, status, needle):
    kw = dict(kw)
    if callable(kw.get("content")): kw["content"] = kw["content"]()
    if name == "multipart without a file":
        kw = dict(content=b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nx\r\n--b--\r\n',
                  headers={"content-type": "multipart/form-data; boundary=b"})
        needle = "no file part"
    with client(gw) as c: r = c.post(route, **kw)  # the default model is the detector
    assert r.status_code == status and needle in r.json()["detail"], (r.status_code, r.text)


@pytest.mark.parametrize("query, needle", [("score_threshold=2", "score_threshold: must be a number from 0 to 1"),
                                           ("score_threshold=x", "score_threshold"), ("max_detections=0", "max_detections: must be an integer")])
def test_bad_detection_parameters_are_422(gw, det, query, needle):
    with client(gw) as c: r = c.post(f"/v1/predict?{query}", content=det["photos"][0])
    assert r.status_code == 422 and needle in r.json()["detail"], r.text


def test_captures_keep_the_boxes(gw, det, tmp_path):
    with client(gw) as c:
        answer = c.post("/v1/predict", params=ALL, content=det["photos"][1], headers={"X-Request-ID": "capture-me"}).json()
        assert c.post("/v1/predict", params=ALL, content=det["photos"][1]).status_code == 200
    import time
    for _ in range(50):
        sides = [json.loads(p.read_text()) for p in (gw.store / "captures" / "det").rglob("*.json")]
        if any(s.get("detections") for s in sides): break
        time.sleep(0.1)
    caps = [s for s in sides if s["detections"] == [{"label": d["label"], "score": d["score"], "bbox": d["box_normalized"]}
                                                     for d in answer["detections"]]]
    assert caps and answer["detections"], (sides[:2], answer)
    # ingested, the capture's boxes become its pre-labels (`capture_detections`), not a classification labelled None
    proj = tmp_path / "proj"; proj.mkdir()
    r = run_cli("data", "ingest", gw.store / "captures" / "det", "--format", "captures", cwd=proj)  # the detector's only
    assert r.returncode == 0, r.stdout + r.stderr
    read = ("import json; from cvops.db import open_dataset; ds = open_dataset(); print(json.dumps([[s.capture_prediction is None, "
            "[(d.label, d.confidence, d.bounding_box) for d in s.capture_detections.detections]] for s in ds]))")
    r = subprocess.run([sys.executable, "-c", read], cwd=proj, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    want = [[True, [[d["label"], d["score"], d["box_normalized"]] for d in answer["detections"]]]]
    assert want[0] in json.loads(r.stdout.strip().splitlines()[-1]), (r.stdout[-1000:], want)


def test_triton_backend_serves_the_detector(det, gw, tmp_path):
    """The same boxes through the gateway → Triton (python variant: the bundle's ONNX graph, one image per request); and
    the KServe v2 calls of tritonclient answered alike by Triton and by the gateway (metadata, the three raw outputs)."""
    triton_mod = pytest.importorskip("cvops.triton", reason="cvops.triton is not there")
    repo = tmp_path / "repo"
    triton_mod.build_repository(det["bundle"], repo, "shapes-det", 1, variant="python")
    server = triton_mod.TritonServer(repo, log_file=tmp_path / "triton.log").start()
    try:
        with Gateway("--model-dir", det["bundle"], "--backend", "triton", "--triton-url", server.grpc_url, "--triton-protocol", "grpc",
                     "--triton-model", "shapes-det", env={"CVOPS_HOME": str(tmp_path / "home")}, log=tmp_path / "gw.log") as g, \
                httpx.Client(base_url=g.url, timeout=60) as c:
            assert c.get("/readyz").status_code == 200, c.get("/readyz").text
            for data in det["photos"][:3] + det["photos"][-1:]:
                r = c.post("/v1/predict", params=ALL, content=data)
                assert r.status_code == 200, r.text
                assert_boxes(r.json()["detections"], expected(det["bundle"], data))
            _v2_alike(server.http_url, {"gateway → Triton": (g.url, "shapes-det", {}), "gateway": (gw.url, "det", {"X-API-Key": KEY})}, det)
    finally: server.stop()


def _v2_alike(triton_url: str, gateways: dict, det):
    "tritonclient.http against Triton (model shapes-det) and against each gateway: the same metadata and outputs."
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException
    targets = {"triton": (triton_url, "shapes-det", {}), **gateways}
    clients = {k: (th.InferenceServerClient(u.removeprefix("http://")), m, h) for k, (u, m, h) in targets.items()}
    try:
        meta = {k: c.get_model_metadata(m, headers=dict(h)) for k, (c, m, h) in clients.items()}
        for k in gateways:
            assert meta[k]["outputs"] == meta["triton"]["outputs"] and meta[k]["inputs"][0] == meta["triton"]["inputs"][0], (k, meta)
        assert [(o["name"], o["datatype"]) for o in meta["triton"]["outputs"]] == [("boxes", "FP32"), ("scores", "FP32"), ("labels", "INT64")]
        n = 0
        for x in det["inputs"][:3]:
            got = {}
            for k, (c, m, h) in clients.items():
                inp = th.InferInput("input", [1, *x.shape], "FP32"); inp.set_data_from_numpy(x[None])
                r = c.infer(m, [inp], outputs=[th.InferRequestedOutput(o, binary_data=o != "scores") for o in ("boxes", "scores", "labels")], headers=dict(h))
                got[k] = [r.as_numpy(o) for o in ("boxes", "scores", "labels")]
            for k in gateways:
                (b, s, l), (tb, ts, tl) = got[k], got["triton"]
                assert (b.dtype, s.dtype, l.dtype) == (tb.dtype, ts.dtype, tl.dtype) == (np.float32, np.float32, np.int64), k
                assert l.tolist() == tl.tolist(), k
                np.testing.assert_allclose(s, ts, atol=1e-5); np.testing.assert_allclose(b, tb, atol=1e-3)
            n += len(got["triton"][1])
        assert n > 0  # the detector found something to compare
        for k in gateways:  # a detector takes one image per request, as Triton serves it
            c, m, h = clients[k]
            inp = th.InferInput("input", [2, *det["inputs"][0].shape], "FP32"); inp.set_data_from_numpy(det["inputs"][:2])
            with pytest.raises(InferenceServerException, match=r"shape must be \[1, 3, 64, 64\]") as err: c.infer(m, [inp], headers=dict(h))
            assert err.value.status() == "400", k
    finally:
        for c, _, _ in clients.values(): c.close()
