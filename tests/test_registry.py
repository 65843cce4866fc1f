"""The model registry on a real artifact store: racing promotions, a promotion killed midway, rollback, corrupted
artifacts, and the CLI. Bundles here hold arbitrary bytes as model.onnx: the registry stores and verifies files and
never runs them (export and serving tests use real ONNX models)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cvops.bundle import write_bundle
from cvops.config import load_config
from cvops.errors import BundleError, IntegrityError, NotFoundError
from cvops.preprocess import PreprocessSpec
from cvops.registry import Registry
from cvops.store import ArtifactStore


def make_bundle(folder: Path, payload: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(payload)
    write_bundle(folder, ["circle", "square"], PreprocessSpec(size=64), name="m")
    return folder


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CVOPS_STORE_URL", raising=False)
    reg = Registry(cfg=load_config(tmp_path))
    for i in (1, 2, 3):
        reg.register(make_bundle(tmp_path / f"b{i}", f"model {i}".encode() * 100), "m",
                     lineage={"run_id": f"r{i}", "dataset_version": "d1"}, metrics={"accuracy": 0.8 + i / 100})
    return tmp_path, reg


RACE = textwrap.dedent("""
    import sys
    from cvops.config import load_config
    from cvops.registry import Registry
    root, version, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    reg = Registry(cfg=load_config(root))
    for i in range(n):
        reg.promote("m", int(version) if i % 2 == 0 else 1, reason=f"racer {version} #{i}")
""")


def test_racing_promotions_end_consistent(project):
    root, reg = project
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(root), v, "15"]) for v in ("2", "3")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    doc = reg.store.read_json("registry/m/aliases.json")  # parses: never half-written
    hist = reg.history("m")
    assert doc["aliases"]["production"] in (1, 2, 3)
    # every recorded change continues from the previous one: no lost update
    for before, after in zip(hist, hist[1:]):
        assert after["from"] == before["to"], (before, after)
    assert hist[-1]["to"] == reg.get("m").version


KILLED = textwrap.dedent("""
    import os, signal, sys
    from cvops.config import load_config
    from cvops.registry import Registry
    from cvops.store import ArtifactStore
    reg = Registry(cfg=load_config(sys.argv[1]))
    def die(self, tmp, final):  # the process dies after writing the new aliases, before renaming them into place
        os.kill(os.getpid(), signal.SIGKILL)
    ArtifactStore._commit = die
    reg.promote("m", 3, reason="killed midway")
""")


def test_promotion_killed_midway_leaves_previous_state(project):
    root, reg = project
    reg.promote("m", 1)
    before = reg.store.read_json("registry/m/aliases.json")
    r = subprocess.run([sys.executable, "-c", KILLED, str(root)])
    assert r.returncode == -9
    assert reg.store.read_json("registry/m/aliases.json") == before
    assert reg.get("m").version == 1
    reg.promote("m", 2)  # the lock died with the process: the registry is usable at once
    assert reg.get("m").version == 2


def test_rollback_restores_previous_champion(project):
    _, reg = project
    reg.promote("m", 1); reg.promote("m", 2); reg.promote("m", 3)
    assert reg.rollback("m")["production"] == 2
    assert reg.rollback("m")["production"] == 1
    assert [h["action"] for h in reg.history("m")] == ["promote"] * 3 + ["rollback"] * 2


def test_corrupted_artifact_refused_on_load(project, tmp_path):
    _, reg = project
    mv = reg.get("m", 2)
    blob = Path(reg.store._obj(mv.files["model.onnx"]))
    blob.write_bytes(blob.read_bytes()[:-1] + b"X")
    with pytest.raises(IntegrityError, match="is corrupted"):
        reg.materialize(mv, tmp_path / "out")
    assert not (tmp_path / "out" / "model.onnx").exists()
    with pytest.raises(IntegrityError):
        reg.promote("m", 2)
    assert "production" not in reg.aliases("m")


def test_unknown_refs_list_what_exists(project):
    _, reg = project
    with pytest.raises(NotFoundError, match=r"no version of model 'm' named '9'; available: 1, 2, 3"):
        reg.get("m", 9)
    with pytest.raises(NotFoundError, match="no model named 'x'; available: m"):
        reg.get("x")


def test_register_refuses_what_the_bundle_reader_refuses(project, tmp_path):
    "The registry stores only bundles `ModelBundle.load` accepts: the gateway and Triton could not serve the others."
    _, reg = project
    fixed = make_bundle(tmp_path / "fixed", b"x")
    meta = json.loads((fixed / "model.json").read_text())
    meta["input"]["shape"] = [1, 3, 64, 64]
    (fixed / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="input needs a dynamic batch axis"):
        reg.register(fixed, "m")
    partial = make_bundle(tmp_path / "partial", b"y")
    (partial / "preprocess.json").unlink()
    with pytest.raises(BundleError, match="is missing preprocess.json"):
        reg.register(partial, "m")
    assert [v.version for v in reg.versions("m")] == [1, 2, 3]


def test_cli_promote_rollback_diff(project, cli):
    root, reg = project
    r = cli("registry", "promote", "2", "--name", "m", cwd=root)
    assert r.returncode == 0 and "production→v2" in r.stdout, r.stderr
    r = cli("registry", "promote", "3", "--name", "m", "--alias", "qa", cwd=root)
    assert "qa→v3" in r.stdout
    r = cli("registry", "list", "--name", "m", cwd=root)
    assert "m v2" in r.stdout and "production" in r.stdout
    r = cli("registry", "diff", "1", "2", "--name", "m", cwd=root)
    assert json.loads(r.stdout)["metrics"]["accuracy"]["delta"] == 0.01
    r = cli("registry", "promote", "7", "--name", "m", cwd=root)
    assert r.returncode == 1 and r.stderr.strip() == "error: no version of model 'm' named '7'; available: 1, 2, 3"
    r = cli("registry", "promote", "2", "--alias", "staging", "--name", "m", cwd=root)
    assert r.returncode == 2 and "unknown alias 'staging'" in r.stderr
    r = cli("registry", "show", "production", "--name", "../etc", cwd=root)
    assert r.returncode == 2 and "invalid model name" in r.stderr
