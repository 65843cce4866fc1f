"""The papermill pipeline end to end on tiny parameters, in a throw-away project: every stage notebook executed,
a complete manifest, a promoted model with lineage, the cache, failure + resume, and a dead or hung kernel reported
within the timeout. Real kernels, real FiftyOne database, real registry."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from conftest import BIN, ROOT, run_cli

TINY = ["-p", "synth_n=240", "-p", "epochs=2", "-p", "qa_min_accuracy=0", "-p", "min_value=0"]


def make_project(folder: Path, stages_dir: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cvops.yaml").write_text(f"stages_dir: {stages_dir}\nimage_size: 32\n")
    return folder


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    stages = root / "stages"
    shutil.copytree(ROOT / "nbs" / "stages", stages)
    return make_project(root / "proj", stages)


def manifest(project: Path, run_id: str | None = None) -> dict:
    runs = sorted((project / ".cvops" / "runs").glob("*"))
    d = project / ".cvops" / "runs" / run_id if run_id else runs[-1]
    return json.loads((d / "manifest.json").read_text())


def test_ill_typed_parameter_fails_before_the_first_stage(project):
    t0 = time.time()
    r = run_cli("run", "-p", "epochs=2.5", cwd=project)
    assert r.returncode == 2, r
    assert "stage train: epochs must be int, got '2.5' (from -p epochs=2.5)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and time.time() - t0 < 30
    assert not (project / ".cvops" / "runs").exists(), "no run may start"
    r = run_cli("run", "-p", "epoch=3", cwd=project)
    assert r.returncode == 2 and "unknown parameter 'epoch'" in r.stderr


def test_full_pipeline_promotes_a_model_with_lineage(project):
    r = run_cli("run", *TINY, cwd=project, timeout=1500)
    assert r.returncode == 0, r.stdout + r.stderr
    m = manifest(project)
    assert m["status"] == "ok"
    names = [s["name"] for s in m["stages"]]
    assert names == ["ingest", "curate", "train", "evaluate", "gate", "export", "deploy"]
    run_dir = project / ".cvops" / "runs" / m["id"]
    for s in m["stages"]:
        assert s["status"] == "ok", s
        nb = nbformat.read(run_dir / s["notebook"], as_version=4)
        assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
        assert s["seconds"] > 0 and s["params"], s
    train = m["stages"][2]
    assert train["params"]["epochs"] == 2 and isinstance(train["params"]["epochs"], int)
    lin = m["lineage"]
    assert {"dataset_version", "training_run", "model_version", "onnx_sha256", "production"} <= set(lin), lin
    assert lin["production"] == lin["model_version"]
    # the registry agrees with the manifest: dataset version ↔ run ↔ model version ↔ ONNX hash
    os.chdir(project)
    from cvops.config import load_config
    from cvops.registry import Registry
    from cvops.store import sha256_bytes
    reg = Registry(cfg=load_config(project))
    mv = reg.get("shapes-classifier", "production")
    assert mv.version == lin["model_version"]
    assert mv.lineage["run_id"] == lin["training_run"] and mv.lineage["dataset_version"] == lin["dataset_version"]
    assert mv.files["model.onnx"] == lin["onnx_sha256"] == sha256_bytes(reg.store.get_bytes(mv.files["model.onnx"]))
    run_doc = reg.store.read_json(f"runs/{lin['training_run']}.json")
    assert run_doc["dataset_version"] == lin["dataset_version"]


def test_second_run_reuses_cache_and_gate_refuses_a_tie(project):
    r = run_cli("run", *TINY, cwd=project, timeout=1500)
    assert r.returncode == 0, r.stdout + r.stderr
    m = manifest(project)
    status = {s["name"]: s["status"] for s in m["stages"]}
    assert status["train"] == "cached" and status["evaluate"] == "cached", status
    gate = next(s for s in m["stages"] if s["name"] == "gate")["outputs"]
    assert gate["promote"] is False and "refuse" in gate["reason"], gate
    assert next(s for s in m["stages"] if s["name"] == "deploy")["outputs"]["deployed"] is False


def _inject_failure(stages: Path, name: str, code: str) -> Path:
    nb_path = next(stages.glob(f"*_{name}.ipynb"))
    nb = nbformat.read(nb_path, as_version=4)
    nb.cells.insert(2, nbformat.v4.new_code_cell(code))
    nbformat.write(nb, nb_path)
    return nb_path


def test_failed_stage_keeps_evidence_and_resume_finishes(project, tmp_path):
    stages = project.parent / "stages"
    original = next(stages.glob("*_gate.ipynb")).read_bytes()
    _inject_failure(stages, "gate", 'raise RuntimeError("injected failure in the gate")')
    try:
        r = run_cli("run", "--stages", "evaluate:export", "--no-cache", cwd=project, timeout=900)
        assert r.returncode == 1, r
        assert "stage gate failed: cell" in r.stderr and "RuntimeError: injected failure in the gate" in r.stderr, r.stderr
        m = manifest(project)
        assert m["status"] == "failed"
        gate = next(s for s in m["stages"] if s["name"] == "gate")
        assert gate["status"] == "failed" and gate["error"]["ename"] == "RuntimeError"
        assert any("injected failure" in line for line in gate["error"]["source"])
        kept = nbformat.read(project / ".cvops" / "runs" / m["id"] / gate["notebook"], as_version=4)
        tb = [o for c in kept.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert tb and tb[0]["ename"] == "RuntimeError"
        evaluate_started = next(s for s in m["stages"] if s["name"] == "evaluate")["started"]
    finally:
        next(stages.glob("*_gate.ipynb")).write_bytes(original)
    r = run_cli("run", "--resume", m["id"], cwd=project, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    m2 = manifest(project, m["id"])
    assert m2["status"] == "ok"
    ev = next(s for s in m2["stages"] if s["name"] == "evaluate")
    assert ev["started"] == evaluate_started, "a finished stage must not run again"
    assert "evaluate" in r.stdout and "done in the resumed run" in r.stdout, r.stdout


SLEEPER = """
import time
from pathlib import Path
Path(stage_dir).mkdir(parents=True, exist_ok=True)
(Path(stage_dir) / "sleeping").touch()  # the test waits for this before killing the kernel mid-cell
time.sleep(600)
"""


def _kernel_pids(parent: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout.splitlines()[1:]
    rows = [(int(l.split(None, 2)[0]), int(l.split(None, 2)[1]), l.split(None, 2)[2]) for l in out if l.strip()]
    kids, frontier = [], {parent}
    while frontier:
        nxt = {pid for pid, ppid, _ in rows if ppid in frontier}
        kids += [pid for pid, _, args in rows if pid in nxt and "ipykernel" in args]
        frontier = nxt
    return kids


@pytest.fixture
def sleeper_project(tmp_path):
    stages = tmp_path / "stages"
    stages.mkdir()
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "python3", "language": "python"}})
    params = nbformat.v4.new_code_cell("source = None\nformat = 'auto'\ndataset = None\nsynth_n = 10\nseed = 0\nrun_dir = None\nstage_dir = None")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(SLEEPER)]
    nbformat.write(nb, stages / "01_ingest.ipynb")
    return make_project(tmp_path / "proj", stages)


def test_killed_kernel_is_reported_within_the_timeout(sleeper_project):
    proc = subprocess.Popen([str(BIN / "cvops"), "run", "--stages", "ingest", "--timeout", "120"], cwd=sleeper_project,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(sleeper_project.glob(".cvops/runs/*/ingest/sleeping")): time.sleep(0.5)
    kernels = _kernel_pids(proc.pid)
    assert kernels, "the stage kernel never reached its sleeping cell"
    t0 = time.time()
    for pid in kernels: os.kill(pid, signal.SIGKILL)  # as the OOM killer would
    out, err = proc.communicate(timeout=120)
    assert time.time() - t0 < 60, "a dead kernel must be noticed quickly"
    assert proc.returncode == 1 and "stage ingest failed: the kernel died" in err, err
    assert manifest(sleeper_project)["stages"][0]["error"]["kind"] == "dead-kernel"


def test_hung_kernel_times_out(sleeper_project):
    t0 = time.time()
    r = run_cli("run", "--stages", "ingest", "--timeout", "5", cwd=sleeper_project, timeout=180)
    assert r.returncode == 1 and "longer than the timeout of 5 s" in r.stderr, r.stderr
    assert time.time() - t0 < 90


def _all_stages() -> list[str]:
    from cvops.pipeline import STAGES
    return list(STAGES)  # the default order and the optional stages


@pytest.mark.parametrize("stage", _all_stages())
def test_stage_notebook_parameters_match_the_declared_schema(stage):
    "The parameters cell of each stage notebook declares exactly its Params model's fields, with the same defaults."
    import papermill as pm
    from cvops.config import load_config
    from cvops.pipeline import STAGES, stage_notebook
    nb = stage_notebook(load_config(ROOT), stage)
    declared = pm.inspect_notebook(str(nb))
    schema = STAGES[stage].schema()
    assert set(declared) == set(schema.model_fields) | {"run_dir", "stage_dir"}, (nb, sorted(declared))
    for name, field in schema.model_fields.items():
        default = field.get_default(call_default_factory=True)
        assert eval(declared[name]["default"]) == default, (stage, name, declared[name]["default"], default)


@pytest.mark.parametrize("stage", _all_stages())
def test_stage_notebook_is_thin(stage):
    "A stage notebook is a parameters cell and a few calls into the library: at most 20 lines of code besides."
    from cvops.config import load_config
    from cvops.pipeline import stage_notebook
    nb = nbformat.read(stage_notebook(load_config(ROOT), stage), as_version=4)
    code = [l for c in nb.cells if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", [])
            for l in c.source.splitlines() if l.strip() and not l.strip().startswith("#")]
    assert len(code) <= 20, (stage, len(code))
    assert not any(l.startswith(("def ", "class ")) for l in code), f"{stage}: logic belongs in a library notebook"
    assert any("save_outputs(" in l for l in code), f"{stage} records its outputs"
