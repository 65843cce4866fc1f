"""cvops outside its repository: the wheel (`python -m build`) carries the stage notebooks; installed for real into a
fresh virtual environment that cannot see the repository (its dependencies come from the dev environment's
site-packages through a .pth file, so nothing is downloaded), `cvops init` + a tiny `cvops run` succeed in a temporary
folder, `cvops serve` answers, and editing the project's copy of a stage notebook changes what runs."""
import json
import os
import shutil
import signal
import site
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nbformat
import pytest

from conftest import ROOT
from serve_helpers import free_port  # the tests' one loopback-port helper

TINY = ["-p", "synth_n=240", "-p", "epochs=1", "-p", "qa_min_accuracy=0", "-p", "min_value=0"]
SOURCES = ["setup.py", "settings.ini", "pyproject.toml", "MANIFEST.in", "README.md", "cvops"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    "The wheel, built from a copy of the package sources (the checkout gets no build/ or egg-info)."
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in SOURCES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(
            ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}))
    r = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return next(out.glob("cvops-*.whl"))


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    "A fresh venv with the wheel installed (no deps) and the dev site-packages after its own, through a .pth file."
    d = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(d)], check=True, timeout=120)
    purelib = subprocess.run([str(d / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # installed before the .pth exists, so pip does not take the dev environment's cvops for this one
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(d / "bin" / "python"), "install", "--no-deps", "--no-index",
                        "--ignore-installed", "--no-cache-dir", "--disable-pip-version-check", str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert list(Path(purelib).glob("cvops-*.dist-info")), r.stdout[-2000:]
    # a plain path line: the dev site-packages' own .pth files (the editable install of this checkout) are not run
    Path(purelib, "_cvops_dev_dependencies.pth").write_text(site.getsitepackages()[0] + "\n")
    return d


def outside_env(venv: Path) -> dict:
    "The environment of a user of the fresh venv: no PYTHONPATH, the venv's bin first on PATH."
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CVOPS_CONFIG", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv), CVOPS_IMAGE_SIZE="32")
    return env


def cvops(venv: Path, *args, cwd: Path, timeout: float = 600):
    return subprocess.run([str(venv / "bin" / "cvops"), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=outside_env(venv), timeout=timeout)


def test_wheel_carries_the_stage_notebooks(wheel):
    import zipfile
    names = zipfile.ZipFile(wheel).namelist()
    stages = sorted(n for n in names if n.startswith("cvops/stages/") and n.endswith(".ipynb"))
    assert [Path(n).name for n in stages] == sorted(p.name for p in (ROOT / "nbs" / "stages").glob("*.ipynb")), stages
    assert {"cvops/project.py", "cvops/cli_project.py", "cvops/workflow.py"} <= set(names)


def test_installed_cvops_does_not_see_the_repository(venv, tmp_path):
    r = subprocess.run([str(venv / "bin" / "python"), "-c", "import cvops, cvops.pipeline as p; print(cvops.__file__); print(p.PACKAGED_STAGES)"],
                       capture_output=True, text=True, cwd=tmp_path, env=outside_env(venv), check=True)
    files = r.stdout.split()
    assert all(f.startswith(str(venv)) for f in files), files
    assert len(list(Path(files[1]).glob("*.ipynb"))) == len(list((ROOT / "nbs" / "stages").glob("*.ipynb")))


@pytest.fixture(scope="module")
def project(venv, tmp_path_factory) -> Path:
    "`cvops init` in an empty folder outside the repository, then the tiny pipeline run there."
    proj = tmp_path_factory.mktemp("outside") / "myproj"
    proj.mkdir()
    r = cvops(venv, "init", cwd=proj)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {"cvops.yaml", ".gitignore", "README.md", "explore.ipynb", "stages"} <= {p.name for p in proj.iterdir()}
    assert (proj / ".github" / "workflows" / "pipeline.yml").exists()
    assert "serve: {capture_rate: 0.1}" in (proj / "cvops.yaml").read_text()  # a new project captures a tenth of its traffic
    # the user's own change to a stage, made before the one run (a second run would double this test's time)
    nb_path = proj / "stages" / "05_gate.ipynb"
    nb = nbformat.read(nb_path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell('save_outputs(stage_dir, **result.outputs(), edited_in_the_project=True)'))
    nbformat.write(nb, nb_path)
    r = cvops(venv, "run", *TINY, cwd=proj, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"stages: the project's, from {proj / 'stages'}" in r.stderr, r.stderr
    return proj


def test_init_then_tiny_run_outside_the_repository(project):
    m = json.loads(next((project / ".cvops" / "runs").glob("*/manifest.json")).read_text())
    assert m["status"] == "ok" and [s["status"] for s in m["stages"]] == ["ok"] * 7, m["stages"]
    assert m["stages_dir"] == str(project / "stages")
    assert m["lineage"]["production"] == m["lineage"]["model_version"]
    assert str(ROOT) not in json.dumps(m), "nothing of the repository may be used"


def test_serve_answers(venv, project):
    port = free_port()
    log = project / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(venv / "bin" / "cvops"), "serve", "--host", "127.0.0.1", "--port", str(port)], cwd=project,
                                env=outside_env(venv), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(url + "/healthz", timeout=0.5).status_code == 200: break
            except httpx.TransportError: time.sleep(0.2)
        image = next((project / ".cvops" / "synthetic").rglob("*.png"))
        r = httpx.post(url + "/v1/predict", files={"file": (image.name, image.read_bytes(), "image/png")}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["model"]["name"] == "shapes-classifier" and r.json()["predictions"], r.json()
    finally:
        proc.send_signal(signal.SIGTERM)
        try: proc.wait(15)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()


def test_editing_the_project_stage_notebook_changes_what_runs(project):
    m = json.loads(next((project / ".cvops" / "runs").glob("*/manifest.json")).read_text())
    gate = next(s for s in m["stages"] if s["name"] == "gate")
    assert gate["outputs"].get("edited_in_the_project") is True, gate
    untouched = next(s for s in m["stages"] if s["name"] == "train")
    assert "edited_in_the_project" not in untouched["outputs"]


def test_without_a_stages_folder_the_packaged_stages_run(venv, tmp_path):
    "A folder with no stages/: `cvops run` says it uses the packaged notebooks (checked on a parameter error: no work)."
    r = cvops(venv, "run", "-p", "epochs=2.5", cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "stages: packaged with cvops" in r.stderr and str(venv) in r.stderr, r.stderr
    assert "epochs must be int" in r.stderr
