"""Make the docs' picture of the FiftyOne App showing captured traffic: pre-labels, ranking and drift fields.

Everything is real: a small project trained by `cvops run`, `cvops serve` capturing every request, undrifted then
drifted traffic (the demo's drift), `cvops data ingest --format captures`, `cvops.rank`, `cvops monitor` (which marks
each capture with its window's drift), and the App (`cvops data app`) photographed by headless Chromium.

    .venv/bin/python scripts/app_screenshot.py [OUT.png [PROJECT DATASET]]   # ≈ 8 min on 2 cores
    .venv/bin/python scripts/app_screenshot.py OUT.png --detection [PROJECT]  # a detector's mistakes (detection tutorial)

It writes OUT.png (the grid) and OUT-sample.png (one sample opened); the docs carry them as attachments of the
markdown cell that shows them in nbs/48_monitor.ipynb. With PROJECT and DATASET it only photographs a project made
before (the App's layout changes between FiftyOne versions: rerun, look, adjust the clicks in `shoot`).
"""
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CVOPS = [str(ROOT / ".venv" / "bin" / "cvops")]
VIEW = "captures-by-priority"


def free_port() -> int:
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120):
    import httpx
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code < 500: return
        except httpx.HTTPError: pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not answer in {timeout} s")


def cli(*args, cwd):
    print("$ cvops", *args, flush=True)
    subprocess.run(CVOPS + [str(a) for a in args], cwd=cwd, check=True)


def main(out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    import httpx
    root = Path(tempfile.mkdtemp(prefix="cvops-appshot-")) / "proj"
    root.mkdir()
    (root / "cvops.yaml").write_text(yaml.safe_dump({
        "image_size": 32, "params": {"ingest": {"synth_n": 800}, "train": {"epochs": 8}, "gate": {"min_value": 0},
                                      "deploy": {"qa_min_accuracy": 0}}}))
    cli("run", cwd=root)
    from cvops.config import load_config
    from cvops.demo_loop import DEMO_DRIFT, send_traffic, synth_set
    cfg = load_config(root)
    port = free_port()
    gw = subprocess.Popen(CVOPS + ["serve", "--port", str(port), "--capture-rate", "1", "--drift-window", "100",
                                   "--drift-every", "100"], cwd=root)
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            print(f"accuracy undrifted {send_traffic(c, synth_set(200, 11, 32)):.2f}, "
                  f"drifted {send_traffic(c, synth_set(200, 12, 32, DEMO_DRIFT)):.2f}")
    finally:
        gw.terminate(); gw.wait(30)
    cli("data", "ingest", f"{cfg.store_location}/captures", "--format", "captures", cwd=root)
    os.chdir(root)
    from cvops.db import open_dataset
    from cvops.rank import rank_captures
    ds = open_dataset(None, cfg)
    print(f"ranked {rank_captures(ds.exists('capture_prediction'))} captures")
    cli("monitor", "--since", "1d", "--window", "100", cwd=root)
    ds.save_view(VIEW, ds.exists("capture_prediction").sort_by("label_priority", reverse=True), overwrite=True)
    ds.reload()  # `cvops monitor` added the drift fields in its own process
    print("drift_flag:", ds.count_values("drift_flag"))
    photograph(root, ds.name, out)


def photograph(root: Path, dataset: str, out: Path):
    "Open the App on the project and photograph the saved view."
    port = free_port()
    app = subprocess.Popen(CVOPS + ["data", "app", "--port", str(port)], cwd=root, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/")
        shoot(f"http://127.0.0.1:{port}/datasets/{dataset}?view={VIEW}", out)
    finally:
        app.terminate(); app.wait(60)


def shoot(url: str, out: Path, fields=("drift_flag", "drift_p_embedding")):
    "The grid of the saved view with priority and drift shown on each tile, then the top sample opened with its fields."
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.goto(url)
        page.wait_for_timeout(8000)
        dismiss = page.get_by_text("Dismiss", exact=True)
        if dismiss.count(): dismiss.first.click()  # FiftyOne's Enterprise advertisement
        for field in fields:  # ticked: each tile shows the value
            name = page.get_by_text(field, exact=True).first
            name.scroll_into_view_if_needed()
            box = name.bounding_box()
            page.mouse.click(box["x"] - 16, box["y"] + box["height"] / 2)  # the checkbox left of the name
            page.wait_for_timeout(500)
        page.wait_for_timeout(2000)
        page.screenshot(path=str(out))
        page.mouse.click(420, 230)  # the first (highest-priority) tile of the grid
        page.wait_for_timeout(4000)
        page.mouse.move(1250, 700); page.mouse.wheel(0, 3000)  # the sample's own fields: pre-label, ranking, drift
        page.wait_for_timeout(1500)
        page.screenshot(path=str(out.with_name(out.stem + "-sample.png")))
        browser.close()
    print(f"wrote {out}")


def detection(out: Path, root: Path|None = None):
    "A detector trained by `cvops run -p task=detection` (or the one in `root`): its confident mistakes in the App."
    out.parent.mkdir(parents=True, exist_ok=True)
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="cvops-appshot-det-")) / "proj"
        root.mkdir()
        (root / "cvops.yaml").write_text(yaml.safe_dump({
            "image_size": 96, "params": {"ingest": {"synth_n": 400}, "train": {"epochs": 10, "batch_size": 16, "lr": 3e-3}}}))
        cli("run", "-p", "task=detection", "--stages", "ingest:evaluate", cwd=root)
    os.chdir(root)
    from cvops.config import load_config
    from cvops.db import fiftyone_db, open_dataset
    from cvops.evaluate import eval_key
    from cvops.train import load_run
    cfg = load_config(root)
    fo, ds, key = fiftyone_db(cfg), open_dataset(None, cfg), eval_key(load_run("latest").id)
    F = fo.ViewField
    # what a 0.3 score threshold would serve wrongly: false boxes (wrong place or class) and missed objects
    view = (ds.match(F("split") == "test")
            .filter_labels("predictions_detections", (F("confidence") >= 0.3) & (F(key) == "fp"), only_matches=False)
            .filter_labels("ground_truth_detections", F(key) == "fn", only_matches=False)
            .match((F("predictions_detections.detections").length() > 0) | (F("ground_truth_detections.detections").length() > 0)))
    name = "detection-mistakes"  # a dataset of its own: the App opens it by URL (a saved view's URL was not applied)
    if fo.dataset_exists(name): fo.delete_dataset(name)
    view.clone(name, persistent=True)
    print(f"{len(view)} test images with a confident false box or a missed object")
    port = free_port()
    app = subprocess.Popen(CVOPS + ["data", "app", "--dataset", name, "--port", str(port)], cwd=root, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/")
        shoot(f"http://127.0.0.1:{port}/datasets/{name}", out, fields=())
    finally:
        app.terminate(); app.wait(60)


if __name__ == "__main__":
    target = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT / "_proc" / "screenshots" / "app-captures.png"
    if len(sys.argv) > 2 and sys.argv[2] == "--detection": detection(target, Path(sys.argv[3]) if len(sys.argv) > 3 else None)
    elif len(sys.argv) > 3: photograph(Path(sys.argv[2]), sys.argv[3], target)  # again, on a project made before: OUT ROOT DATASET
    else: main(target)
