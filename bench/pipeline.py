"""Pipeline overhead (SPEC §7): the stage notebooks run through papermill (`cvops run`, a fresh kernel per stage) vs
the very same stage code executed cell by cell in one Python process. Both start from a fresh process and a fresh
project (no cache), on the demo pipeline's parameters. Prints the ratio next to the target and writes
bench/results/pipeline.json."""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.10


def make_project(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "cvops.yaml").write_text(f"stages_dir: {ROOT / 'nbs' / 'stages'}\n")
    return folder


def run_in_one_process(project: Path, assignments: list[str]) -> None:
    "Execute every stage notebook's code cells in this process, with the parameters `cvops run` would inject."
    import matplotlib
    matplotlib.use("Agg")
    import nbformat
    from IPython.display import display
    from cvops.config import load_config
    from cvops.pipeline import RunManifest, StageRecord, resolve_params, select_stages, stage_notebook, stage_params
    os.chdir(project)
    cfg = load_config(project)
    specs = select_stages(cfg)
    per_stage = resolve_params(specs, assignments, cfg.params)
    run_dir = project / ".cvops" / "inprocess"
    manifest = RunManifest(id="inprocess", created="", stages=[StageRecord(name=s.name) for s in specs])
    for spec in specs:
        params = stage_params(spec, per_stage[spec.name], manifest, cfg)  # inputs from earlier stages, as `cvops run` fills them
        stage_dir = run_dir / spec.name
        ns = dict(params, run_dir=str(run_dir), stage_dir=str(stage_dir), display=display, __name__="__stage__")
        nb = nbformat.read(stage_notebook(cfg, spec.name), as_version=4)
        t0 = time.perf_counter()
        for cell in nb.cells:
            if cell.cell_type == "code" and "parameters" not in cell.metadata.get("tags", []):
                exec(compile(cell.source, f"{spec.name}", "exec"), ns)
        manifest.stage(spec.name).outputs = json.loads((stage_dir / "outputs.json").read_text())
        print(f"in one process: {spec.name} {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)


def timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0: sys.exit(f"failed: {' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--synth-n", type=int, default=1200)
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default: the training default)")
    ap.add_argument("--inprocess", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("-p", dest="assignments", action="append", default=[], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inprocess:
        run_in_one_process(a.inprocess, a.assignments); return
    assignments = [f"synth_n={a.synth_n}"] + ([f"epochs={a.epochs}"] if a.epochs else [])
    with tempfile.TemporaryDirectory() as tmp:
        one = make_project(Path(tmp) / "inprocess")
        pm = make_project(Path(tmp) / "papermill")
        flags = [x for kv in assignments for x in ("-p", kv)]
        t_one = timed([sys.executable, __file__, "--inprocess", str(one), *flags], one)
        t_pm = timed([str(Path(sys.executable).parent / "cvops"), "run", *flags], pm)
        manifest = json.loads(next((pm / ".cvops" / "runs").glob("*/manifest.json")).read_text())
    per_stage = {s["name"]: s["seconds"] for s in manifest["stages"]}
    ratio = t_pm / t_one
    print(f"{'measure':<44}{'value':>12}{'target':>10}")
    print(f"{'same stage code in one process (s)':<44}{t_one:>12.1f}")
    print(f"{'cvops run through papermill (s)':<44}{t_pm:>12.1f}")
    print(f"{'papermill ÷ one process':<44}{ratio:>11.2f}×{'≤ 1.10×':>10}  {'OK' if ratio <= TARGET else 'MISSED'}")
    print("per stage (papermill, s): " + ", ".join(f"{k} {v:.1f}" for k, v in per_stage.items()))
    out = ROOT / "bench" / "results"; out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.json").write_text(json.dumps(dict(inprocess_s=t_one, papermill_s=t_pm, ratio=ratio, target=TARGET,
                                                       per_stage_s=per_stage, assignments=assignments), indent=2))


if __name__ == "__main__":
    from cvops.config import set_process_defaults
    set_process_defaults()  # an entry point: OMP_WAIT_POLICY=PASSIVE (unless set) before torch is imported, as `cvops` does
    main()
