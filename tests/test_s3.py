"""Data and artifacts on object storage, against a real S3-protocol server (moto's) on loopback: ingest of every source
format from s3://, a dataset version written there, loaded back, verified and caught when tampered with, a registry
promotion with aliases and history, captures written and ingested, the store's lock between two "machines", and the
one-line errors for a missing bucket, missing credentials and an unreachable endpoint.

The endpoint and credentials reach every cvops process the standard way: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY in the environment (CLI children inherit them). One server and one FiftyOne database per session."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from conftest import BIN
from cvops.config import load_config
from cvops.errors import IntegrityError, ParameterError, StorageError
from cvops.store import ArtifactStore, open_url
from cvops.synth import generate

BUCKET = "cvops-test"


def free_port() -> int:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    return port


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    "A moto S3 server on loopback with one bucket; the environment points every S3 client at it."
    from moto.server import ThreadedMotoServer
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    root = tmp_path_factory.mktemp("s3proj")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "CVOPS_HOME": str(root / ".cvops"),
           "CVOPS_STORE_URL": f"s3://{BUCKET}/store", "FIFTYONE_DO_NOT_TRACK": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield dict(client=client, endpoint=env["AWS_ENDPOINT_URL"], root=root)
    try:
        if "cvops.data" in sys.modules: sys.modules["cvops.data"].close_db()  # stop the session's mongod, if one started
    finally:
        server.stop()
        for k, v in old.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v


def s3fs_():
    return open_url(f"s3://{BUCKET}")[0]


def upload(local: Path, prefix: str) -> str:
    "Copy a local folder to s3://BUCKET/<prefix>/ and return its URL."
    fs = s3fs_()
    for p in sorted(local.rglob("*")):
        if p.is_file(): fs.put_file(str(p), f"{BUCKET}/{prefix}/{p.relative_to(local).as_posix()}")
    return f"s3://{BUCKET}/{prefix}"


def test_sources_from_s3_match_local(s3, tmp_path):
    "Folder tree, CSV and COCO read from s3:// give the same items, labels and bytes as the same files on disk."
    from cvops.sources import read_source
    tree = tmp_path / "tree"; generate(out=tree, n=8, seed=1, size=32, progress=False)
    flat = tmp_path / "flat"; flat.mkdir()
    imgs = sorted(tree.rglob("*.png"))
    for i, p in enumerate(imgs[:4]): (flat / f"img{i}.png").write_bytes(p.read_bytes())
    (flat / "labels.csv").write_text("filename,label\nimg0.png,circle\nimg1.png,square\n")
    (flat / ".hidden").write_text("x")
    coco = tmp_path / "coco"; (coco / "images").mkdir(parents=True)
    for i, p in enumerate(imgs[:3]): (coco / "images" / f"{i}.png").write_bytes(p.read_bytes())
    (coco / "ann.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i}.png", "width": 32, "height": 32} for i in range(3)],
        "annotations": [{"id": 1, "image_id": 0, "category_id": 1, "bbox": [1, 1, 10, 10]},
                        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0, 0, 20, 20]}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}))
    for local, fmt in ((tree, "folder"), (flat, "csv"), (coco, "coco")):
        url = upload(local, f"src-{uuid.uuid4().hex[:6]}/{local.name}")
        lf, litems, lskip = read_source(local)
        rf, ritems, rskip = read_source(url)
        assert lf == rf == fmt, (lf, rf)
        assert [(i.name, i.label, i.fields) for i in ritems] == [(i.name, i.label, i.fields) for i in litems]
        assert [i.read() for i in ritems] == [i.read() for i in litems] and rskip == lskip
    # the same checks as on disk: a CSV naming a file the prefix does not hold
    bad = upload(flat, "bad/flat")
    s3fs_().pipe_file(f"{BUCKET}/bad/flat/labels.csv", b"filename,label\nnope.png,circle\n")
    with pytest.raises(ParameterError, match=f"names 1 file\\(s\\) not in s3://{BUCKET}/bad/flat"): read_source(bad)


def test_version_on_s3_roundtrip_and_tamper(s3, tmp_path):
    "Ingest from S3 into a store on S3, version, load back with a fresh store, verify; tampering is caught."
    from cvops.data import ingest
    from cvops.versions import create_version, export_version, load_version, verify_version
    cfg = load_config()
    assert cfg.store_location == f"s3://{BUCKET}/store"
    tree = tmp_path / "tree"; generate(out=tree, n=12, seed=2, size=32, progress=False)
    url = upload(tree, "data/tree")
    ds = f"s3ds-{uuid.uuid4().hex[:6]}"
    rep = ingest(url, ds, progress=False)
    assert rep.format == "folder" and rep.added == 12 and not rep.quarantined
    v = create_version(ds)
    fresh = ArtifactStore(f"s3://{BUCKET}/store")
    back = load_version(v.id, ds, store=fresh)
    assert back == v and verify_version(back, fresh) == 12
    out = export_version(back, tmp_path / "out", store=fresh)
    assert len(list(out.rglob("*.png"))) == 12
    keys = [o["Key"] for o in s3["client"].list_objects_v2(Bucket=BUCKET, Prefix="store/")["Contents"]]
    assert f"store/docs/datasets/{ds}/versions/{v.id}.json" in keys and not any("/tmp/" in k for k in keys)
    # tamper with one image blob: verification names it and where it lives
    victim = back.samples[0].sha256
    s3["client"].put_object(Bucket=BUCKET, Key=f"store/objects/{victim[:2]}/{victim}", Body=b"not the image")
    with pytest.raises(IntegrityError, match=f"artifact {victim[:12]}… is corrupted.*s3://{BUCKET}/store/objects"):
        verify_version(back, fresh)
    # tamper with the manifest: loading refuses it
    key = f"store/docs/datasets/{ds}/versions/{v.id}.json"
    doc = json.loads(s3["client"].get_object(Bucket=BUCKET, Key=key)["Body"].read())
    doc["samples"][0]["label"] = "forged"
    s3["client"].put_object(Bucket=BUCKET, Key=key, Body=json.dumps(doc).encode())
    with pytest.raises(IntegrityError, match="was modified"): load_version(v.id, ds, store=fresh)


def test_captures_written_to_and_ingested_from_s3(s3, tmp_path):
    "The gateway's capture writer on an S3 store; the captures ingested from there with their predictions."
    from cvops.capture import Capture, CaptureWriter
    from cvops.data import ingest, open_dataset
    generate(out=tmp_path / "raw", n=3, seed=3, size=32, progress=False)
    imgs = sorted((tmp_path / "raw").rglob("*.png"))
    store_url = f"s3://{BUCKET}/capstore-{uuid.uuid4().hex[:6]}"
    writer = CaptureWriter(store_url, rate=1.0).start()
    for p in imgs:
        assert writer.offer(Capture(data=p.read_bytes(), model="shapes", version=2, content_type="image/png",
                                    image_format="PNG", topk=[{"label": "star", "score": 0.75}]))
    assert writer.flush(30)
    writer.stop()
    ds = f"s3cap-{uuid.uuid4().hex[:6]}"
    rep = ingest(f"{store_url}/captures", ds, progress=False)
    assert rep.format == "captures" and rep.added == 3 and rep.unlabelled == 3, rep.summary()
    s = open_dataset(ds).first()
    assert s.capture_model == "shapes" and s.capture_model_version == 2 and s.capture_prediction.label == "star"


def make_bundle(folder: Path, payload: bytes) -> Path:
    from cvops.bundle import write_bundle
    from cvops.preprocess import PreprocessSpec
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(payload)  # the registry stores and verifies files, it never runs them
    write_bundle(folder, ["circle", "square"], PreprocessSpec(size=64), name="m")
    return folder


RACE = textwrap.dedent("""
    import sys
    from cvops.registry import Registry
    reg = Registry()
    for i in range(int(sys.argv[2])):
        reg.promote(sys.argv[1], 2 if i % 2 == 0 else 1, alias="qa", reason=f"racer {sys.argv[3]} #{i}")
""")


def test_registry_promotion_on_s3_and_lock_between_machines(s3, tmp_path):
    "Register, promote, roll back on S3; racing promoters with separate local lock folders (two 'machines')."
    from cvops.registry import Registry
    name = f"m-{uuid.uuid4().hex[:6]}"
    reg = Registry()
    assert reg.store.url == f"s3://{BUCKET}/store"
    for i in (1, 2): reg.register(make_bundle(tmp_path / f"b{i}", f"model {i}".encode() * 50), name, metrics={"accuracy": 0.8 + i / 100})
    assert reg.promote(name, 1, reason="first") == {"production": 1}
    assert reg.promote(name, 2, reason="better") == {"production": 2}
    again = Registry()  # another process's view: everything is in the bucket
    assert again.aliases(name) == {"production": 2} and again.get(name).version == 2
    assert [(h["from"], h["to"], h["action"]) for h in again.history(name)] == [(None, 1, "promote"), (1, 2, "promote")]
    assert again.rollback(name, reason="bad canary") == {"production": 1}
    # two racers, each with its own HOME: their local lock files differ, only the S3 lease keeps them apart
    procs = [subprocess.Popen([sys.executable, "-c", RACE, name, "4", str(k)],
                              env={**os.environ, "HOME": str(tmp_path / f"home{k}")}) for k in (1, 2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    hist = [h for h in Registry().history(name) if h["alias"] == "qa"]
    # every recorded change follows from the one before it: no promotion was lost to a concurrent write
    assert hist and all(a["to"] == b["from"] for a, b in zip(hist, hist[1:]))
    assert Registry().aliases(name)["qa"] == hist[-1]["to"]
    # a tampered model file stops a promotion
    mv = Registry().get(name, 2)
    sha = mv.files["model.onnx"]
    s3["client"].put_object(Bucket=BUCKET, Key=f"store/objects/{sha[:2]}/{sha}", Body=b"evil")
    with pytest.raises(IntegrityError, match="is corrupted"): Registry().promote(name, 2, reason="tampered")


def test_lease_waits_times_out_and_takes_over_stale(s3, tmp_path, monkeypatch):
    store = ArtifactStore(f"s3://{BUCKET}/lockstore")
    a = store.lock("x", timeout=5)
    monkeypatch.setenv("HOME", str(tmp_path))  # a second "machine": its own local lock file
    b = store.lock("x", timeout=0.5)
    assert a.local.lock_file != b.local.lock_file and a.key == b.key
    with a:
        t = time.monotonic()
        with pytest.raises(StorageError, match=r"lock s3://.*/locks/x.lease is held by .*:\d+ since"): b.acquire()
        assert 0.4 < time.monotonic() - t < 5
    with b: pass  # released: the other one gets it at once
    stale = store.lock("x", timeout=5, stale_after=0.2)
    a.acquire()  # a holder that "crashed": it never releases
    time.sleep(0.3)
    with stale: assert json.loads(s3fs_().cat_file(stale.key))["owner"].endswith(f":{os.getpid()}")
    a.local.release()


def run_cvops(*args, env):
    return subprocess.run([str(BIN / "cvops"), *args], capture_output=True, text=True, timeout=120, env=env)


def test_bad_storage_fails_in_one_line(s3, tmp_path):
    "A missing bucket, no credentials, an unreachable endpoint: one line each, exit code 3, before any work."
    env = {k: v for k, v in os.environ.items()}
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist at http://127.0.0.1"):
        ArtifactStore("s3://no-such-bucket/store")
    r = run_cvops("data", "ingest", "s3://no-such-bucket/data", "--dataset", "nope", env=env)
    assert r.returncode == 3 and "does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    nocreds = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    nocreds.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
                   AWS_EC2_METADATA_DISABLED="true")
    r = run_cvops("data", "ingest", f"s3://{BUCKET}/data", "--dataset", "nope", env=nocreds)
    assert r.returncode == 3 and "no credentials for s3://" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_cvops("registry", "list", env={**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"})
    assert r.returncode == 3 and "cannot reach the storage endpoint" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
