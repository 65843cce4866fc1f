"""Shared fixtures: the repo root, the venv's cvops executable, and a subprocess runner."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cvops.config import set_process_defaults

set_process_defaults()  # an entry point: passive OpenMP waiting before any test imports torch
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
os.environ.setdefault("WANDB_SILENT", "true")


def run_cli(*args, timeout=300, cwd=None, env=None):
    "Run the installed `cvops` executable; returns the CompletedProcess (text mode)."
    return subprocess.run([str(BIN / "cvops"), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env={**os.environ, **(env or {})})


@pytest.fixture
def cli():
    return run_cli
