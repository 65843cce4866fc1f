"""The loop closed, end to end on synthetic data, every part real: a project trained by the pipeline; the gateway
(`cvops serve`, capture on, following the registry) scoring drift; drifted traffic raising the drift gauge read from
/metrics; the captures ingested with pre-labels; labels through the real local Label Studio (the generator's truth
posted through its HTTP API, *standing in for a labeling team*); `loop_once` retraining from the champion through the
pipeline; the gate promoting; the gateway serving the new version by itself; and the accuracy on held-out drifted
images improving. The act is `cvops demo --loop`'s second act (`cvops.demo_loop.loop_act`), at a small scale."""
import os
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from conftest import run_cli  # noqa: E402
from labelstudio_helpers import labelstudio_env_or_skip, labelstudio_seed, start_from_seed  # noqa: E402
from serve_helpers import Gateway  # noqa: E402

WINDOW = 60
MARGIN = 0.05  # the stated improvement on held-out drifted images


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    labelstudio_env_or_skip()
    seed = labelstudio_seed(tmp_path_factory.mktemp("lsseed"))
    root = tmp_path_factory.mktemp("loop") / "proj"
    root.mkdir()
    (root / "cvops.yaml").write_text(yaml.safe_dump({
        "image_size": 32,  # no stages/ folder: the packaged stage notebooks run
        "params": {"ingest": {"synth_n": 800}, "train": {"epochs": 8}, "gate": {"min_value": 0}, "deploy": {"qa_min_accuracy": 0}}}))
    r = run_cli("run", cwd=root, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    srv = start_from_seed(root / ".cvops", seed)
    yield root
    srv.stop()


def test_drift_labels_retrain_promote_serve(project):
    from cvops.config import load_config
    from cvops.demo_loop import LoopActParams, loop_act
    cfg = load_config(project)
    old = os.getcwd(); os.chdir(project)  # the library calls below find the project as the CLI would
    try:
        with Gateway("--capture-rate", 1, "--drift-window", WINDOW, "--drift-every", WINDOW, "--drift-interval-s", 0,
                     "--watch-s", 1, cwd=project, log=project / "gateway.log") as g:
            lines = []
            res = loop_act(LoopActParams(clean=WINDOW, drifted=2 * WINDOW, holdout=120, label_limit=400, min_new_labels=50,
                                         window=WINDOW, wait_s=120), g.url, cfg, echo=lines.append)
    finally: os.chdir(old)
    print("\n".join(lines))
    assert res["drift_clean"]["flag"] == 0 and res["drift_drifted"]["flag"] == 1, res
    assert res["labels"]["annotated"] >= 50 and res["labels"]["accepted"] + res["labels"]["corrected"] == res["labels"]["annotated"]
    assert res["loop"]["drift"] is True and res["loop"]["retrain"] and res["version_after"] == res["version_before"] + 1, res["loop"]
    assert res["accuracy_drifted_after"] >= res["accuracy_drifted_before"] + MARGIN, (res["accuracy_drifted_before"], res["accuracy_drifted_after"])
    # the new model's reference is the traffic since the drift began: new drifted traffic is its normal, not drift
    assert any("drift reference of the new model" in n for n in res["loop"]["notes"]), res["loop"]["notes"]
    assert res.get("drift_after", {}).get("flag") == 0, res.get("drift_after")
