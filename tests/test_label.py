"""The labeling round trip against a real local Label Studio 1.23.2 (cvops' own env) and FiftyOne's Label Studio backend.

Captures (with the serving model's top-k) → ingest with pre-labels → `cvops label send` (a new process) → annotations
submitted through Label Studio's HTTP API, *standing in for a person* → `cvops label pull` (a new process) → the
FiftyOne labels, the counted corrections, and a new dataset version. One browser test drives Debian's Chromium with
Playwright (no browser download) through Label Studio's own UI.

The Label Studio env is created once per machine (like Triton's: `<repo>/.cvops/labelstudio-env` or
`CVOPS_LABELSTUDIO_ENV`); if it cannot be created (no network) every test here skips, saying so. The first start on
an empty data folder runs migrations (≈ 35 s on an idle machine): it happens once, into `<repo>/.cvops/labelstudio-seed`,
which later sessions copy (a start on a copy ≈ 3.5 s).
"""
import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from cvops.errors import CvopsError
from labelstudio_helpers import SEED, labelstudio_env_or_skip, labelstudio_seed, start_from_seed
CLASSES = ["circle", "square", "star", "triangle"]


def _api(conn, method, path, body=None):
    "Label Studio's HTTP API with the token FiftyOne uses."
    req = urllib.request.Request(conn.url + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Token {conn.api_key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read()
        return json.loads(text) if text else None


@pytest.fixture(scope="session")
def ls_env():
    return labelstudio_env_or_skip()


@pytest.fixture(scope="session")
def seed(ls_env, tmp_path_factory):
    "A migrated Label Studio data folder with its admin, made once per machine and copied by every session."
    return labelstudio_seed(tmp_path_factory.mktemp("lsseed"))


@pytest.fixture(scope="session")
def project(seed, tmp_path_factory):
    "A throwaway project: labelled synthetic shapes plus six captures, and its Label Studio started from the seed."
    root = tmp_path_factory.mktemp("labelproj")
    env = {"CVOPS_HOME": str(root / ".cvops"), "CVOPS_STORE_URL": str(root / "store"), "CVOPS_DATASET": "lab"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    srv = start_from_seed(root / ".cvops", seed)
    _ingest(root)
    yield {"root": root, "server": srv}
    srv.stop()
    from cvops.data import close_db
    close_db()
    for k, v in old.items():
        if v is None: os.environ.pop(k, None)
        else: os.environ[k] = v


# top-k of each capture: from a coin toss to a sure thing, so the ranking has an order to get right
TOPK = [[0.34, 0.33, 0.33], [0.5, 0.45, 0.05], [0.6, 0.3, 0.1], [0.8, 0.15, 0.05], [0.95, 0.04, 0.01], [0.99, 0.005, 0.005]]


def _ingest(root):
    import fsspec
    from cvops.capture import Capture, write_capture
    from cvops.data import ingest, open_dataset
    from cvops.synth import generate
    generate(out=root / "shapes", n=24, seed=1, size=32, progress=False)
    ingest(root / "shapes", "lab", progress=False)
    generate(out=root / "capsrc", n=8, seed=2, size=32, progress=False)
    caps = sorted((root / "capsrc").rglob("*.png"))[:6]
    fs = fsspec.filesystem("file")
    for i, (f, scores) in enumerate(zip(caps, TOPK)):
        top = [{"label": CLASSES[(i + j) % 4], "score": s} for j, s in enumerate(scores)]
        write_capture(fs, str(root / "store"), Capture(data=f.read_bytes(), model="shapes", version=1, topk=top,
                                                       content_type="image/png", image_format="PNG"))
    ingest(root / "store" / "captures", "lab", progress=False)
    ds = open_dataset("lab"); ds.default_classes = CLASSES; ds.save()


def _conn(project):
    return project["server"].connection()


def test_start_twice_reuses(project):
    from cvops.label_server import LabelStudioServer
    srv = project["server"]
    t0 = time.monotonic()
    again = LabelStudioServer(project["root"] / ".cvops").start()
    assert again.info()["pid"] == srv.info()["pid"] and time.monotonic() - t0 < 3
    print(f"\nLabel Studio start on a copied seed: {srv.startup_seconds} s; first start (migrations): "
          f"{json.loads((SEED / 'first_start.json').read_text())['seconds']} s")
    cred = (project["root"] / ".cvops" / "labelstudio" / "credentials.json")
    assert oct(cred.stat().st_mode & 0o777) == "0o600"
    assert json.loads(cred.read_text())["token"] not in (srv.log_path.read_text() + json.dumps(srv.info()))


def test_round_trip(project):
    from cvops.data import open_dataset
    from cvops.versions import create_version
    conn = _conn(project)
    r = run_cli("label", "send", "--limit", "4", timeout=600)
    assert r.returncode == 0 and "sent 4 of 6 candidates" in r.stdout, r.stdout + r.stderr
    ds = open_dataset("lab"); ds.reload()
    sent = ds.exists("label_task").sort_by("label_task")
    # highest-ranked first: Label Studio's task order is the priority order, and the sure captures stayed behind
    prio = sent.values("label_priority")
    assert prio == sorted(prio, reverse=True) and len(sent) == 4
    assert max(ds.exists("capture_prediction").exists("label_task", False).values("label_priority")) <= min(prio)
    tasks = sent.values("label_task"); pre = sent.values("capture_prediction.label")
    # standing in for a person: three annotations through Label Studio's API (one keeps the pre-label, two correct it)
    answers = [pre[0], CLASSES[(CLASSES.index(pre[1]) + 1) % 4], CLASSES[(CLASSES.index(pre[2]) + 2) % 4]]
    for tid, label in zip(tasks[:3], answers):
        _api(conn, "POST", f"/api/tasks/{tid}/annotations", {"result": [
            {"from_name": "label_draft", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]})
    r = run_cli("label", "pull", timeout=600)
    assert r.returncode == 0 and "pulled 3 new labels (1 pre-labels accepted, 2 corrected)" in r.stdout, r.stdout + r.stderr
    ds.reload()
    done = ds.match_tags("labeled").sort_by("label_task")
    assert done.values("ground_truth.label") == answers and done.values("prelabel_corrected") == [False, True, True]
    assert set(done.values("label_annotator")) == {"admin@cvops.example.com"}
    r = run_cli("label", "pull", timeout=600)  # pulling twice adds nothing
    assert "pulled 0 new labels" in r.stdout and "3 already pulled, 1 not finished" in r.stdout, r.stdout
    v = create_version("lab")
    by_sha = {s.sha256: s.label for s in v.samples}
    assert all(by_sha.get(s) == l for s, l in zip(done.values("sha256"), answers))
    # a deleted task and an unknown class are reported, never applied
    _api(conn, "DELETE", f"/api/tasks/{tasks[3]}")
    from cvops.label import pull, send, status
    r2 = send("lab", limit=1)
    t2 = ds.select(ds.match({"label_run": r2["run"]}).values("id")).first().label_task
    _api(conn, "POST", f"/api/tasks/{t2}/annotations", {"result": [
        {"from_name": "label_draft", "to_name": "image", "type": "choices", "value": {"choices": ["unicorn"]}}]})
    rep = pull("lab")
    assert rep.applied == 0 and rep.already == 3
    assert [d["task"] for d in rep.deleted] == [tasks[3]] and [(u["task"], u["label"]) for u in rep.unknown] == [(t2, "unicorn")]
    ds.reload()
    assert len(ds.match_tags("labeled")) == 3 and "unicorn" not in ds.distinct("ground_truth.label")
    rows = status("lab")
    assert [(x["sent"], x["done"], x["deleted"], x["pulled"]) for x in rows] == [(4, 3, 1, 3), (1, 1, 0, 0)]


def test_browser_annotation(project):
    "Debian's Chromium, driven by Playwright, opens a task cvops created, picks a class and submits; pull sees it."
    if not Path("/usr/bin/chromium").exists(): pytest.skip("no /usr/bin/chromium")
    from playwright.sync_api import sync_playwright
    from cvops.data import open_dataset
    from cvops.label import send
    conn = _conn(project)
    r = send("lab", limit=1)
    assert r["sent"] == 1
    ds = open_dataset("lab"); ds.reload()
    s = ds.match({"label_run": r["run"]}).first()
    choice = CLASSES[(CLASSES.index(s.capture_prediction.label) + 1) % 4]
    cred = json.loads((project["root"] / ".cvops" / "labelstudio" / "credentials.json").read_text())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1400})  # all four choices on screen
        page.goto(conn.url + "/user/login")
        page.fill("input[name=email]", cred["username"]); page.fill("input[name=password]", cred["password"])
        page.click("button[type=submit]")
        page.wait_for_url(lambda u: "/user/login" not in u, timeout=60000)
        page.goto(f"{conn.url}/projects/{r['project_id']}/data?task={s.label_task}")
        try:
            page.get_by_text(choice).first.click(timeout=60000)  # the choice's text carries its hotkey: not an exact match
            page.get_by_role("button", name="Submit").click(timeout=30000)
        except Exception:
            page.screenshot(path=str(project["root"] / "browser.png")); raise
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _api(conn, "GET", f"/api/tasks/{s.label_task}")["annotations"]:
            time.sleep(0.5)
        browser.close()
    res = run_cli("label", "pull", timeout=600)
    assert res.returncode == 0 and "pulled 1 new labels (0 pre-labels accepted, 1 corrected)" in res.stdout, res.stdout + res.stderr
    ds.reload()
    assert ds[s.id].ground_truth.label == choice


def test_stop_stops_only_ours(project, tmp_path):
    from cvops.label_server import LabelStudioServer, _alive
    srv = project["server"]
    pid = srv.info()["pid"]
    assert LabelStudioServer(tmp_path).stop() is False and _alive(pid)  # another home: nothing of ours to stop there
    assert srv.stop() is True and not _alive(pid) and srv.info() is None
    srv.start()  # a restart on the migrated folder
    print(f"\nLabel Studio restart: {srv.startup_seconds} s")
    assert srv.info()["pid"] != pid and srv.startup_seconds < 60
