"""Label Studio for tests: cvops' own env (created once per machine, or skipped with the reason when it cannot be),
and a migrated data folder made once per machine (the first start runs migrations, ≈ 35 s idle) that every test
session copies (a start on a copy ≈ 3.5 s)."""
import json
import os
import shutil
from pathlib import Path

import pytest
from filelock import FileLock

from conftest import ROOT
from cvops.errors import CvopsError

SEED = ROOT / ".cvops" / "labelstudio-seed"


def labelstudio_env_or_skip() -> Path:
    "The machine's Label Studio env (`<repo>/.cvops/labelstudio-env` unless CVOPS_LABELSTUDIO_ENV says otherwise)."
    os.environ.setdefault("CVOPS_LABELSTUDIO_ENV", str(ROOT / ".cvops" / "labelstudio-env"))
    from cvops.label_server import ensure_labelstudio_env
    try: return ensure_labelstudio_env()
    except CvopsError as e: pytest.skip(f"the Label Studio env cannot be created here: {str(e).splitlines()[0]}")


def labelstudio_seed(scratch: Path) -> Path:
    "A migrated Label Studio data folder with its admin, made once per machine (in `scratch` the first time)."
    from cvops.label_server import LabelStudioServer
    SEED.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(SEED) + ".lock", timeout=1200):
        if not (SEED / "data" / "label_studio.sqlite3").exists():
            srv = LabelStudioServer(scratch, ready_timeout=900).start()
            first = srv.startup_seconds
            srv.stop()
            tmp = SEED.with_name(SEED.name + ".tmp"); shutil.rmtree(tmp, ignore_errors=True); tmp.mkdir()
            shutil.copytree(srv.data_dir, tmp / "data"); shutil.copy2(srv.dir / "credentials.json", tmp / "credentials.json")
            (tmp / "first_start.json").write_text(json.dumps({"seconds": first}))
            shutil.rmtree(SEED, ignore_errors=True); os.replace(tmp, SEED)
    return SEED


def start_from_seed(home: Path, seed: Path):
    "Start the project's managed Label Studio (under `home`) on a copy of the seed."
    from cvops.label_server import LabelStudioServer
    (home / "labelstudio").mkdir(parents=True, exist_ok=True)
    shutil.copy2(seed / "credentials.json", home / "labelstudio" / "credentials.json")
    return LabelStudioServer(home, seed=seed / "data").start()
