"""k8s/ manifests: what k8s/generate.py writes, serving exactly the deployments/ files, valid
against the real CRDs (KubeRay RayService and RayCluster, prometheus-operator PodMonitor;
copies in k8s/schemas/) and the core Kubernetes schemas (kubernetes-validate); a broken
copy fails.

CRD schemas leave unknown fields to the API server's pruning; the checks here reject them,
as `kubectl apply` does with strict field validation, so a misspelt field fails.
"""
from __future__ import annotations

import copy
import importlib.util
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from raypp.serve.app import parse_args

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
K8S_VERSION = "1.30.0"   # the oldest Kubernetes that current KubeRay releases support well


def _generator():
    spec = importlib.util.spec_from_file_location("k8s_generate", K8S / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


MANIFESTS = ["raypp-70b-tp8-pp2.yaml", "raypp-tiny-cpu.yaml", "monitoring.yaml", "grafana-dashboard.yaml"]


def _strict(schema):
    """The CRD schema with unknown fields rejected wherever it lists the known ones."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@cache
def _crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> strict openAPIV3Schema, from every CRD in k8s/schemas/."""
    out = {}
    for path in (K8S / "schemas").glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        for v in crd["spec"]["versions"]:
            out[(f"{crd['spec']['group']}/{v['name']}", crd["spec"]["names"]["kind"])] = \
                _strict(v["schema"]["openAPIV3Schema"])
    return out


def _pod_templates(doc: dict) -> list[dict]:
    cluster = doc["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def validate(doc: dict) -> None:
    """Raises jsonschema.ValidationError (or kubernetes-validate's) if `doc` is invalid."""
    key = (doc["apiVersion"], doc["kind"])
    if key in _crd_schemas():
        jsonschema.validate(doc, _crd_schemas()[key])
        if doc["kind"] == "RayService":
            # The embedded cluster against the RayCluster CRD too, and each pod template
            # against core Kubernetes (as a PodTemplate).
            jsonschema.validate(doc["spec"]["rayClusterConfig"],
                                _crd_schemas()[("ray.io/v1", "RayCluster")]["properties"]["spec"])
            for i, template in enumerate(_pod_templates(doc)):
                kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                              "metadata": {"name": f"{doc['metadata']['name']}-{i}"},
                                              "template": template}, K8S_VERSION, strict=True)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", MANIFESTS)
def test_committed_manifest_is_the_generated_one(name):
    assert (K8S / name).read_text() == _generator().render(name), f"run `python k8s/generate.py` and commit {name}"


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifests_are_valid(name):
    docs = _docs(name)
    assert docs
    for doc in docs:
        validate(doc)


def _rayservice(name: str) -> dict:
    return next(d for d in _docs(name) if d["kind"] == "RayService")


def test_rayservices_serve_the_deployment_files():
    gpu = yaml.safe_load(_rayservice("raypp-70b-tp8-pp2.yaml")["spec"]["serveConfigV2"])
    assert gpu == yaml.safe_load((REPO / "deployments" / "70b_tp8_pp2.yaml").read_text())
    cpu = yaml.safe_load(_rayservice("raypp-tiny-cpu.yaml")["spec"]["serveConfigV2"])
    expected = yaml.safe_load((REPO / "deployments" / "tiny_cpu.yaml").read_text())
    expected["http_options"]["host"] = "0.0.0.0"
    expected["applications"][0]["args"]["model"]["path"] = "/models/tiny"
    assert cpu == expected
    for config in (gpu, cpu):
        ServeDeploySchema.model_validate(config)          # what KubeRay hands to Serve
        parse_args(config["applications"][0]["args"])     # what raypp's build_app accepts


def test_gpu_layout_has_two_8_gpu_workers_on_the_shared_model_volume():
    doc = _rayservice("raypp-70b-tp8-pp2.yaml")
    args = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["args"]
    (group,) = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == args["parallel"]["pp"] == 2
    pod = group["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(args["parallel"]["tp"])
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert container["readinessProbe"] and container["livenessProbe"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "models")
    assert args["model"]["path"].startswith(mount["mountPath"] + "/")
    claim = next(v for v in pod["volumes"] if v["name"] == "models")["persistentVolumeClaim"]["claimName"]
    assert any(d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == claim
               for d in _docs("raypp-70b-tp8-pp2.yaml"))


def test_dashboard_configmap_carries_the_dashboard():
    (cm,) = _docs("grafana-dashboard.yaml")
    assert yaml.safe_load(cm["data"]["raypp.json"]) == yaml.safe_load((REPO / "dashboards" / "raypp.json").read_text())
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"


def _break_worker_replicas(docs):
    _rayservice_in(docs)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"


def _break_container_field(docs):
    container = _rayservice_in(docs)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"][
        "containers"][0]
    container["imagePulPolicy"] = container.pop("imagePullPolicy")


def _break_group_name(docs):
    del _rayservice_in(docs)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]


def _break_probe(docs):
    _rayservice_in(docs)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "livenessProbe"]["periodSeconds"] = "often"


def _break_pvc(docs):
    next(d for d in docs if d["kind"] == "PersistentVolumeClaim")["spec"]["accessModes"] = "ReadOnlyMany"


def _rayservice_in(docs):
    return next(d for d in docs if d["kind"] == "RayService")


@pytest.mark.parametrize("breaker", [_break_worker_replicas, _break_container_field, _break_group_name,
                                     _break_probe, _break_pvc])
def test_a_broken_copy_of_the_gpu_manifest_fails(breaker):
    docs = copy.deepcopy(_docs("raypp-70b-tp8-pp2.yaml"))
    breaker(docs)
    with pytest.raises(jsonschema.ValidationError):
        for doc in docs:
            validate(doc)


def test_broken_monitoring_and_configmap_fail():
    (monitor,) = copy.deepcopy(_docs("monitoring.yaml"))
    monitor["spec"]["podMetricsEndpoints"][0]["port"] = 8080      # a port *name* is a string
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)
    (cm,) = copy.deepcopy(_docs("grafana-dashboard.yaml"))
    cm["data"]["raypp.json"] = {"panels": []}                     # ConfigMap data are strings
    with pytest.raises(jsonschema.ValidationError):
        validate(cm)
