"""Deployment assets under serving/: they parse, have the expected shape, and the Grafana dashboard and the Prometheus
configs only refer to what the gateway really exports (scraped from a live gateway) and to ports it really uses."""
import json
import re
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).parent))
from serve_helpers import Gateway  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SERVING = ROOT / "serving"
DASHBOARD = SERVING / "grafana" / "dashboards" / "cvops-gateway.json"


def k8s_docs():
    docs = []
    for f in sorted((SERVING / "k8s").glob("*.yaml")):
        docs += [(f.name, d) for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def test_every_yaml_and_json_parses():
    files = [*SERVING.rglob("*.yaml"), *SERVING.rglob("*.yml")]
    assert len(files) >= 8
    for f in files: assert list(yaml.safe_load_all(f.read_text())), f
    for f in SERVING.rglob("*.json"): json.loads(f.read_text())


def test_kubernetes_manifests_have_the_expected_kinds():
    docs = k8s_docs()
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in docs if d["kind"] != "Kustomization"}
    assert {("Deployment", "cvops-gateway"), ("Service", "cvops-gateway"), ("HorizontalPodAutoscaler", "cvops-gateway"),
            ("Deployment", "triton"), ("Service", "triton"), ("PersistentVolumeClaim", "triton-model-repository"),
            ("ConfigMap", "prometheus-cvops")} <= kinds, kinds
    for _, d in docs: assert d.get("apiVersion"), d
    by = {(d["kind"], d["metadata"]["name"]): d for _, d in docs if d["kind"] != "Kustomization"}
    kust = yaml.safe_load((SERVING / "k8s" / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(f.name for f in (SERVING / "k8s").glob("*.yaml") if f.name != "kustomization.yaml")
    hpa = by[("HorizontalPodAutoscaler", "cvops-gateway")]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "cvops-gateway"}
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # Triton reads its model repository from the PVC
    triton = by[("Deployment", "triton")]["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in triton["containers"][0]["volumeMounts"]}
    vols = {v["name"]: v for v in triton["volumes"]}
    assert mounts["model-repository"] == "/models"
    assert vols["model-repository"]["persistentVolumeClaim"]["claimName"] == "triton-model-repository"
    assert "--model-repository=/models" in triton["containers"][0]["args"]
    # selectors match pod labels; the gateway's probes hit its real endpoints; its args are real `cvops serve` options
    for name in ("cvops-gateway", "triton"):
        dep, svc = by[("Deployment", name)], by[("Service", name)]
        assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    gw = by[("Deployment", "cvops-gateway")]["spec"]["template"]["spec"]["containers"][0]
    assert (gw["readinessProbe"]["httpGet"]["path"], gw["livenessProbe"]["httpGet"]["path"]) == ("/readyz", "/healthz")
    from cvops.serve_config import ServeSettings
    options = {a[2:].replace("-", "_") for a in gw["args"] if a.startswith("--")}
    assert options <= set(ServeSettings.model_fields), options - set(ServeSettings.model_fields)
    assert "triton:8000" in gw["args"]


def test_compose_and_prometheus_agree():
    compose = yaml.safe_load((SERVING / "compose.yaml").read_text())
    assert set(compose["services"]) == {"triton", "gateway", "prometheus", "grafana"}
    gw = compose["services"]["gateway"]
    assert gw["build"]["dockerfile"] == "serving/gateway/Dockerfile"
    assert "8080:8080" in gw["ports"]
    from cvops.serve_config import ServeSettings
    assert {a[2:].replace("-", "_") for a in gw["command"] if a.startswith("--")} <= set(ServeSettings.model_fields)
    prom = yaml.safe_load((SERVING / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert {"gateway:8080", "triton:8002"} <= targets
    assert "--metrics-port=8002" in compose["services"]["triton"]["command"]


def test_gateway_dockerfile_installs_only_the_serve_extra():
    text = (SERVING / "gateway" / "Dockerfile").read_text()
    installs = re.findall(r"pip (?:install|wheel)[^\n]*", text)
    assert installs and all("[serve]" in line for line in installs), installs
    assert not re.search(r"(torch|fiftyone|lightning|\[dev\]|\[train\]|\[data\])", "\n".join(installs)), installs
    assert "'torch' not in sys.modules" in text  # the build itself checks the gateway imports no torch
    assert "ENTRYPOINT [\"cvops\", \"serve\"]" in text
    ignore = [l for l in (SERVING / "gateway" / "Dockerfile.dockerignore").read_text().splitlines() if l and not l.startswith("#")]
    assert ignore[0] == "*" and "!cvops/" in ignore


def dashboard_exprs():
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_queries_only_metrics_the_gateway_exports(tmp_path):
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    used = {m for e in exprs for m in re.findall(r"\bcvops_[a-z0-9_]+\b", e)}
    bundle = tmp_path / "bundle"
    _toy_bundle(bundle)
    with Gateway("--model-dir", bundle, "--shadow-dir", bundle, "--capture-rate", 1, "--capture-url", tmp_path / "store",
                 "--drift-window", 20, "--drift-every", 20, "--drift-interval-s", 0,
                 env={"CVOPS_HOME": str(tmp_path / "home")}, log=tmp_path / "gw.log") as g:
        from PIL import Image
        import io, time
        with httpx.Client(base_url=g.url) as c:
            for i in range(20):  # a full drift window, so the drift gauges have samples
                buf = io.BytesIO(); Image.new("RGB", (20, 20), (120, 50 + 5 * i, 200)).save(buf, "PNG")
                assert c.post("/v1/predict", content=buf.getvalue(), headers={"content-type": "image/png"}).status_code == 200
            for _ in range(50):
                if "cvops_drift_windows_total{" in c.get("/metrics").text: break
                time.sleep(0.1)
            assert c.post("/v1/predict", content=b"", headers={"content-type": "image/png"}).status_code == 400
            assert c.post("/v1/admin/reload").status_code == 200
            assert c.get("/readyz").status_code == 200
            text = c.get("/metrics").text
    exported = set()
    for fam in text_string_to_metric_families(text):
        exported.add(fam.name)
        exported |= {s.name for s in fam.samples}
    assert used <= exported, f"dashboard queries metrics the gateway does not export: {sorted(used - exported)}"
    # and the dashboard covers each area the gateway measures
    for needed in ("cvops_requests_total", "cvops_request_latency_seconds_bucket", "cvops_predictions_total",
                   "cvops_input_brightness_bucket", "cvops_input_contrast_bucket", "cvops_capture_total", "cvops_shadow_agreement",
                   "cvops_drift_flag", "cvops_drift_p_value"):
        assert needed in used, needed


def _toy_bundle(folder: Path, size: int = 16):
    "A tiny ONNX model bundle (cvops.bundle.toy_bundle) with an embedding and a drift reference."
    from cvops.bundle import ModelBundle, toy_bundle, write_bundle
    from cvops.drift import DriftReference
    toy_bundle(folder, size=size, embedding=True)
    b = ModelBundle.load(folder)
    rng = np.random.default_rng(0)
    ref = DriftReference(stats={"brightness": rng.random(40).tolist(), "contrast": rng.random(40).tolist()},
                         embeddings=rng.random((40, 3)).tolist(), classes={c: 10 for c in b.classes})
    write_bundle(folder, list(b.classes), b.spec, name="toy", embedding_dim=3, reference=ref.model_dump())
