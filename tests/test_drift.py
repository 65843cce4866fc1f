"""Drift on live traffic, end to end through real processes: a `cvops serve` gateway scoring drift against the
reference its bundle carries, read from /metrics; a real Prometheus (Debian's package) scraping it with the shipped
alert rules loaded; the rule logic under `promtool test rules`; and a real Alertmanager routing a drift alert to the
`cvops loop --webhook` receiver, which starts a turn of the loop."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from conftest import BIN, ROOT  # noqa: E402
from serve_helpers import Gateway, free_port, make_bundle, make_images  # noqa: E402

RULES = ROOT / "serving" / "prometheus" / "drift-rules.yml"
WINDOW = 60


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("drift")
    # the generator's files sort by class; traffic arrives in no particular order: shuffle (seeded: the test is deterministic)
    rng = np.random.default_rng(0)
    train = list(rng.permutation(make_images(root / "train", n=160, seed=0)))
    bundle = make_bundle(root / "bundle", train, reference=train[:120])  # the reference: 120 training images
    clean = list(rng.permutation(make_images(root / "clean", n=WINDOW * 2, seed=1)))
    from cvops.synth import generate
    generate(out=root / "drifted", n=WINDOW * 2, seed=2, brightness=2.2, blur=1.5, progress=False)  # the demo's drift knobs
    return dict(root=root, bundle=bundle, clean=clean, drifted=list(rng.permutation(sorted((root / "drifted").rglob("*.png")))))


@pytest.fixture(scope="module")
def gw(assets):
    home = assets["root"] / "home"
    with Gateway("--model-dir", assets["bundle"], "--drift-window", WINDOW, "--drift-every", WINDOW, "--drift-interval-s", 0,
                 env={"CVOPS_HOME": str(home)}, log=assets["root"] / "gateway.log") as g:
        yield g


def drift_metrics(g) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(httpx.get(g.url + "/metrics").text):
        for s in fam.samples:
            if s.name.startswith("cvops_drift"): out[(s.name, s.labels.get("test"), s.labels.get("drift"))] = s.value
    return out


def send(g, images, windows_before: int) -> dict:
    "Send the images one by one; wait until their window is scored; return the drift metrics."
    with httpx.Client(base_url=g.url, timeout=30) as c:
        for p in images:
            r = c.post("/v1/predict", content=p.read_bytes(), headers={"content-type": "image/png"})
            assert r.status_code == 200 and r.json()["predictions"], r.text
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = drift_metrics(g)
        if sum(v for (n, _, _), v in m.items() if n == "cvops_drift_windows_total") > windows_before: return m
        time.sleep(0.2)
    raise AssertionError(f"no drift window scored after {len(images)} requests: {drift_metrics(g)}")


def test_clean_traffic_keeps_the_flag_down_and_drifted_traffic_raises_it(gw, assets):
    m = send(gw, assets["clean"][:WINDOW], 0)
    assert m[("cvops_drift_flag", None, None)] == 0, m
    assert {t for (n, t, _) in m if n == "cvops_drift_p_value"} == {"brightness", "contrast", "width", "height", "embedding", "classes"}
    assert 0 < m[("cvops_drift_threshold", None, None)] < 0.05  # Bonferroni over the six tests
    m = send(gw, assets["drifted"][:WINDOW], 1)
    assert m[("cvops_drift_flag", None, None)] == 1, m
    assert m[("cvops_drift_p_value", "brightness", None)] < m[("cvops_drift_threshold", None, None)], m
    assert m[("cvops_drift_windows_total", None, "true")] == 1 and m[("cvops_drift_windows_total", None, "false")] == 1


def test_promtool_unit_tests_of_the_alert_rules():
    if not shutil.which("promtool"): pytest.skip("promtool not installed (Debian package prometheus)")
    r = subprocess.run(["promtool", "test", "rules", "drift-rules.test.yml"], cwd=RULES.parent, capture_output=True, text=True)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def _wait(url, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200: return
        except httpx.TransportError: pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not come up")


def test_prometheus_scrapes_the_drift_gauges_and_loads_the_rule(gw, assets, tmp_path):
    "Runs after the drifted traffic: a real Prometheus sees the flag at 1 and the drift alert pending (its `for` is 2m)."
    if not shutil.which("prometheus"): pytest.skip("prometheus not installed (Debian package prometheus)")
    port = free_port()
    shutil.copy(RULES, tmp_path / "drift-rules.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": ["drift-rules.yml"],
        "scrape_configs": [{"job_name": "gateway", "static_configs": [{"targets": [gw.url.removeprefix("http://")]}]}]}))
    proc = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prom.log", "w"))
    try:
        api = f"http://127.0.0.1:{port}/api/v1"
        _wait(f"http://127.0.0.1:{port}/-/ready")
        deadline, alerts = time.monotonic() + 30, []
        while time.monotonic() < deadline:
            q = httpx.get(f"{api}/query", params={"query": "cvops_drift_flag"}).json()["data"]["result"]
            alerts = httpx.get(f"{api}/alerts").json()["data"]["alerts"]
            if q and alerts: break
            time.sleep(0.5)
        assert q and q[0]["metric"]["model"] == "shapes" and q[0]["value"][1] == "1", q
        assert [(a["labels"]["alertname"], a["labels"]["model"], a["state"]) for a in alerts] == [("CvopsDrift", "shapes", "pending")], alerts
    finally:
        proc.terminate(); proc.wait(10)


def test_alertmanager_routes_a_drift_alert_to_the_loop_webhook(tmp_path):
    "A real Alertmanager delivers the alert to `cvops loop --webhook` (dry run, in an empty project: the turn decides and starts nothing)."
    am_bin = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if not am_bin: pytest.skip("alertmanager not installed (Debian package prometheus-alertmanager)")
    hook_port, am_port = free_port(), free_port()
    loop = subprocess.Popen([str(BIN / "cvops"), "loop", "--webhook", "--dry-run", "--port", str(hook_port)], cwd=tmp_path,
                            env={**__import__("os").environ, "CVOPS_HOME": str(tmp_path / ".cvops")},
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "loop.log", "w"))
    (tmp_path / "am.yml").write_text(yaml.safe_dump({
        "route": {"receiver": "cvops-loop", "group_wait": "0s", "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [{"name": "cvops-loop", "webhook_configs": [{"url": f"http://127.0.0.1:{hook_port}/alerts"}]}]}))
    am = subprocess.Popen([am_bin, f"--config.file={tmp_path / 'am.yml'}", f"--storage.path={tmp_path / 'am'}",
                           f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="],
                          stdout=subprocess.DEVNULL, stderr=open(tmp_path / "am.log", "w"))
    try:
        _wait(f"http://127.0.0.1:{hook_port}/status"); _wait(f"http://127.0.0.1:{am_port}/-/ready")
        alert = [{"labels": {"alertname": "CvopsDrift", "model": "shapes-classifier", "severity": "warning"},
                  "annotations": {"summary": "input drift"}}]
        assert httpx.post(f"http://127.0.0.1:{am_port}/api/v2/alerts", json=alert).status_code == 200
        deadline, status = time.monotonic() + 30, {}
        while time.monotonic() < deadline:
            status = httpx.get(f"http://127.0.0.1:{hook_port}/status").json()
            if status.get("last") or status.get("error"): break
            time.sleep(0.3)
        assert status["started"] == 1 and status["error"] is None, (status, (tmp_path / "loop.log").read_text()[-2000:])
        assert status["last"]["retrain"] is False and "dry run" not in status["last"]["reason"], status  # nothing trained yet
    finally:
        for p in (am, loop):
            p.terminate()
            try: p.wait(10)
            except subprocess.TimeoutExpired: p.kill()
