"""The foundation: CLI exit codes and messages, synthetic data determinism, store atomicity and verification,
and the notebook/library sync check of the test command."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import BIN, ROOT
from cvops.errors import IntegrityError, NotFoundError
from cvops.store import ArtifactStore


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file(): h.update(f.relative_to(folder).as_posix().encode()); h.update(f.read_bytes())
    return h.hexdigest()


def test_version(cli):
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip().startswith("cvops 0."), r


def test_help_everywhere(cli):
    for args in ([], ["data"], ["data", "synth"]):
        r = cli(*args, "--help")
        assert r.returncode == 0 and "Usage:" in r.stdout, (args, r.stderr)


def test_synth_is_deterministic_per_seed(cli, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 0), (b, 0), (c, 1)):
        r = cli("data", "synth", "--out", out, "--n", 300, "--seed", seed)
        assert r.returncode == 0, r.stderr
    files = sorted(a.rglob("*.png"))
    assert len(files) == 300
    assert sorted(p.name for p in a.iterdir()) == ["circle", "square", "star", "triangle"]
    assert tree_digest(a) == tree_digest(b)
    assert tree_digest(a) != tree_digest(c)


@pytest.mark.parametrize("args, needle", [
    (["--n", "-1"], "n should be greater than or equal to 1"),
    (["--n", "2.5"], "n must be int, got '2.5'"),
    (["--out", "/proc/cvops-unwritable"], "is not writable"),
    (["--background", "lava"], "background must be"),
    (["-p", "colour=red"], "unknown parameter 'colour'"),
])
def test_synth_bad_arguments_exit_2_with_one_line(cli, tmp_path, args, needle):
    base = ["--out", tmp_path / "out"] if "--out" not in args else []
    r = cli("data", "synth", *base, *args)
    assert r.returncode == 2, r
    assert needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def test_synth_detection_writes_coco_and_checks_its_knobs(cli, tmp_path):
    "`cvops data synth-detection`: images/ + COCO annotations.json, deterministic per seed; a knob pair that cannot hold is one line."
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        r = cli("data", "synth-detection", "--out", out, "--n", 12, "--seed", 3)
        assert r.returncode == 0 and "wrote 12 images with" in r.stdout, r.stderr
    coco = json.loads((a / "annotations.json").read_text())
    assert len(coco["images"]) == 12 and len(list((a / "images").iterdir())) == 12
    assert 12 <= len(coco["annotations"]) <= 48 and {c["name"] for c in coco["categories"]} == {"circle", "square", "star", "triangle"}
    assert tree_digest(a) == tree_digest(b)
    r = cli("data", "synth-detection", "--out", tmp_path / "c", "--objects-min", 5, "--objects-max", 2)
    assert r.returncode == 2 and r.stderr.strip() == "error: objects_min (5) must not exceed objects_max (2)", r.stderr


def test_unwritable_out_under_a_file(cli, tmp_path):
    (tmp_path / "file").write_text("x")
    r = cli("data", "synth", "--out", tmp_path / "file" / "sub", "--n", 3)
    assert r.returncode == 2 and "is not writable" in r.stderr and "Traceback" not in r.stderr


def test_unknown_command_exits_2(cli):
    r = cli("dta")
    assert r.returncode == 2 and "No such command" in r.stderr


# -- store -------------------------------------------------------------------

KILL_MID_WRITE = textwrap.dedent("""
    import os, signal, sys
    from cvops.store import ArtifactStore
    store = ArtifactStore(sys.argv[1])
    def chunks():
        yield b"a" * (1 << 20)
        yield b"b" * (1 << 20)
        os.kill(os.getpid(), signal.SIGKILL)  # the process dies mid-write, as on a power cut or OOM kill
        yield b"never"
    store.put_stream(chunks())
""")


def test_interrupted_write_is_never_visible(tmp_path):
    r = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(tmp_path)], capture_output=True)
    assert r.returncode == -9, r
    store = ArtifactStore(tmp_path)
    assert store.list() == []
    assert list((tmp_path / "tmp").glob("*.part")), "the partial write should be left only as a .part file"
    partial = hashlib.sha256(b"a" * (1 << 20) + b"b" * (1 << 20)).hexdigest()
    with pytest.raises(NotFoundError):
        store.get_bytes(partial)
    assert store.clean_tmp() == 1 and store.list() == []


def test_corrupted_artifact_fails_verification(tmp_path):
    store = ArtifactStore(tmp_path)
    art = store.put_bytes(os.urandom(4096))
    assert store.verify(art.sha256).size == 4096
    blob = Path(art.uri)
    data = bytearray(blob.read_bytes()); data[100] ^= 0xFF; blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=f"artifact {art.sha256[:12]}… is corrupted"):
        store.get_bytes(art.sha256)
    with pytest.raises(IntegrityError):
        store.get_file(art.sha256, tmp_path / "copy.bin")
    assert not (tmp_path / "copy.bin").exists()


def test_store_keys_cannot_escape(tmp_path):
    store = ArtifactStore(tmp_path / "s")
    for key in ("../x.json", "a/../../x.json", "/etc/passwd", "a//b"):
        with pytest.raises(Exception, match="invalid store key"):
            store.write_json(key, {})


# -- notebooks are the source --------------------------------------------------

def test_hand_edit_of_library_fails_the_sync_check(tmp_path):
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("nbs", "cvops", "settings.ini", "setup.py", "Makefile", "README.md", "pyproject.toml"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, work / name)
    make = ["make", "--no-print-directory", "check-sync", f"VENV={BIN.parent}"]
    ok = subprocess.run(make, cwd=work, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    lib = work / "cvops" / "config.py"
    lib.write_text(lib.read_text() + "\nHAND_EDIT = 1\n")
    bad = subprocess.run(make, cwd=work, capture_output=True, text=True)
    assert bad.returncode != 0
    assert "do not edit it by hand" in bad.stderr and "nbs/" in bad.stderr
    assert "HAND_EDIT = 1" in lib.read_text(), "the hand edit must be kept, not silently overwritten"
