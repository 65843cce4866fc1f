"""The pipeline as an Argo Workflow (`cvops workflow`): built with Hera, the emitted YAML validated with Hera's models
(the Argo API schema), every stage a step in the project's order with its parameters; the pipeline image's Dockerfile
is shipped (not built here: no Docker in CI)."""
import yaml
from hera.workflows import models as m

from conftest import ROOT, run_cli


def test_emitted_workflow_validates_and_names_every_stage_in_order(tmp_path):
    proj = tmp_path / "proj"
    assert run_cli("init", proj).returncode == 0
    (proj / "cvops.yaml").write_text((proj / "cvops.yaml").read_text().replace("    epochs: 8 ", "    epochs: 5 "))
    r = run_cli("workflow", "--out", "argo", "--set", "train.lr=0.01,synth_n=240", "--store-url", "s3://team/cvops", cwd=proj)
    assert r.returncode == 0, r.stdout + r.stderr
    wf = m.Workflow.model_validate(yaml.safe_load((proj / "argo" / "workflow.yaml").read_text()))
    cron = m.CronWorkflow.model_validate(yaml.safe_load((proj / "argo" / "cronworkflow.yaml").read_text()))
    assert cron.spec.concurrency_policy == "Forbid" and cron.spec.workflow_spec.entrypoint == "pipeline"
    stages = ["ingest", "curate", "train", "evaluate", "gate", "export", "deploy"]
    steps = [g.root[0] for g in next(t for t in wf.spec.templates if t.name == "pipeline").steps]
    assert [s.template for s in steps] == stages
    tpl = {t.name: t for t in wf.spec.templates}
    for i, stage in enumerate(stages, 1):
        c = tpl[stage].container
        assert c.command == ["cvops"] and c.args[:5] == ["run", "--run-id", "{{workflow.name}}", "--stages", stage]
        env = {e.name: e for e in c.env}
        assert env["CVOPS_STORE_URL"].value == "s3://team/cvops"
        assert env["FIFTYONE_DATABASE_URI"].value_from.secret_key_ref.name == "cvops-mongo"
        assert [a.name for a in tpl[stage].outputs.artifacts] == ["notebook", "manifest"]
        assert tpl[stage].outputs.artifacts[0].path.endswith(f"/{i:02d}_{stage}.ipynb")
    params = {t: {p.name: p.value for p in (tpl[t].inputs.parameters if tpl[t].inputs else [])} for t in stages}
    assert params["train"]["epochs"] == "5" and params["train"]["lr"] == "0.01"  # cvops.yaml, then --set
    assert params["ingest"]["synth_n"] == "240" and "run_id" not in params["evaluate"]
    args = {p.name: p.value for p in wf.spec.arguments.parameters}
    assert args["train-epochs"] == "5" and "-p" in tpl["train"].container.args
    assert "train.epochs={{inputs.parameters.epochs}}" in tpl["train"].container.args
    gpu = {t: (tpl[t].container.resources.limits or {}) if tpl[t].container.resources else {} for t in stages}
    assert "nvidia.com/gpu" in gpu["train"] and not any("nvidia.com/gpu" in gpu[t] for t in stages if t != "train")


def test_bad_stage_parameter_stops_before_writing(tmp_path):
    r = run_cli("workflow", "--out", tmp_path / "argo", "--set", "epochs=two", cwd=tmp_path)
    assert r.returncode == 2 and "stage train: epochs must be int" in r.stderr, r.stderr
    assert not (tmp_path / "argo").exists()


def test_pipeline_dockerfile_is_shipped():
    text = (ROOT / "serving" / "pipeline" / "Dockerfile").read_text()
    assert "cvops[train,data,s3,pipeline]" in text and "cvops init /project" in text  # pipeline: papermill and its kernel
