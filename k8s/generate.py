"""Writes raypp's Kubernetes manifests (KubeRay RayService, monitoring, dashboard) into k8s/.

    python k8s/generate.py

The RayServices' `serveConfigV2` is taken from deployments/: verbatim for the 70B
TP8 x PP2 layout, and for the CPU variant deployments/tiny_cpu.yaml with only what a
pod needs changed (listen on all interfaces, the checkpoint on the shared volume).
The dashboard ConfigMap carries dashboards/raypp.json.  tests/test_k8s.py checks
that the committed files are what this writes, so none of them drifts.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "k8s"
RAY_VERSION = "2.60.0"
NAME_LABEL = {"app.kubernetes.io/name": "raypp"}
METRICS_PORT = 8080   # Ray's metrics agent on every node: what the PodMonitor scrapes

# KubeRay's own health checks (what it injects when a pod has none): the raylet on every node,
# the GCS on the head, and Serve's proxy on workers that run one (never on the head: KubeRay
# deploys the serve config through the head's Service, which must list the head before that).
RAYLET_OK = "wget -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success"
GCS_OK = "wget -T 2 -q -O- http://localhost:8265/api/gcs_healthz | grep success"
PROXY_OK = "wget -T 2 -q -O- http://localhost:8000/-/healthz | grep success"


def _probe(command: str, initial_delay_s: int, failures: int) -> dict:
    return {"exec": {"command": ["bash", "-c", command]}, "initialDelaySeconds": initial_delay_s,
            "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": failures}


def _ports(head: bool) -> list[dict]:
    ports = [{"name": "metrics", "containerPort": METRICS_PORT}, {"name": "serve", "containerPort": 8000}]
    if head:
        ports += [{"name": "gcs-server", "containerPort": 6379}, {"name": "dashboard", "containerPort": 8265},
                  {"name": "client", "containerPort": 10001}]
    return ports


def _container(image: str, resources: dict, head: bool, serve_ready: bool, volume_mounts: list[dict]) -> dict:
    ready = f"{RAYLET_OK} && {GCS_OK}" if head else RAYLET_OK
    if serve_ready:
        ready += f" && {PROXY_OK}"
    return {
        "name": "ray-head" if head else "ray-worker",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "ports": _ports(head),
        "resources": {"requests": resources, "limits": resources},
        # Loading a checkpoint and building the pipeline takes minutes: liveness waits that long.
        "readinessProbe": _probe(ready, 10, 12),
        "livenessProbe": _probe(f"{RAYLET_OK} && {GCS_OK}" if head else RAYLET_OK, 60, 24),
        "volumeMounts": volume_mounts,
        # Ray stops its processes cleanly before the pod goes.
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}},
    }


def _pod(container: dict, volumes: list[dict], tolerations: list[dict] | None = None) -> dict:
    spec = {"containers": [container], "volumes": volumes}
    if tolerations:
        spec["tolerations"] = tolerations
    return {"metadata": {"labels": dict(NAME_LABEL)}, "spec": spec}


def _start_params(**extra: str) -> dict:
    return {"metrics-export-port": str(METRICS_PORT), **extra}


def rayservice(name: str, serve_config: str, head: dict, worker: dict) -> dict:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": dict(NAME_LABEL)},
        "spec": {
            "serveConfigV2": serve_config,
            "rayClusterConfig": {"rayVersion": RAY_VERSION, "headGroupSpec": head, "workerGroupSpecs": [worker]},
        },
    }


def gpu_70b() -> list[dict]:
    image = f"raypp:0.1.0-ray{RAY_VERSION}-gpu"
    models = {"name": "models", "persistentVolumeClaim": {"claimName": "raypp-models", "readOnly": True}}
    # NCCL moves activations through shared memory inside a node; the container default (64 MB) is too small.
    shm = {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}}
    mounts = [{"name": "models", "mountPath": "/models", "readOnly": True}, {"name": "dshm", "mountPath": "/dev/shm"}]
    head = {
        # The head runs Serve's controller and the LLMServer replica (1 CPU), no GPU work.
        "rayStartParams": _start_params(**{"num-gpus": "0", "dashboard-host": "0.0.0.0"}),
        "template": _pod(_container(image, {"cpu": "8", "memory": "32Gi"}, head=True, serve_ready=False,
                                    volume_mounts=mounts[:1]), [models]),
    }
    gpu_node = {"cpu": "48", "memory": "480Gi", "nvidia.com/gpu": "8"}
    worker = {
        "groupName": "gpu-8x",
        # One replica's pipeline: stage 0 on one pod, stage 1 on the other (8 GPUs each).
        # `num_replicas: N` in the serve config needs 2N pods here.
        "replicas": 2, "minReplicas": 2, "maxReplicas": 2,
        "rayStartParams": _start_params(),
        "template": _pod(_container(image, gpu_node, head=False, serve_ready=True, volume_mounts=mounts),
                         [models, shm],
                         tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]),
    }
    pvc = {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "raypp-models", "labels": dict(NAME_LABEL)},
        "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "200Gi"}}},
    }
    serve_config = (REPO / "deployments" / "70b_tp8_pp2.yaml").read_text()
    return [pvc, rayservice("raypp-70b-tp8-pp2", serve_config, head, worker)]


def tiny_cpu_serve_config() -> dict:
    """deployments/tiny_cpu.yaml as a pod runs it."""
    config = yaml.safe_load((REPO / "deployments" / "tiny_cpu.yaml").read_text())
    config["http_options"]["host"] = "0.0.0.0"           # reached through the Service, not loopback
    config["applications"][0]["args"]["model"]["path"] = "/models/tiny"   # the volume every pod mounts
    return config


def cpu_tiny() -> list[dict]:
    image = f"raypp:0.1.0-ray{RAY_VERSION}-cpu"
    # kind / minikube: one node, so a hostPath is a volume every pod shares; the first replica
    # writes the tiny checkpoint there and every stage worker reads it.
    models = {"name": "models", "hostPath": {"path": "/tmp/raypp-models", "type": "DirectoryOrCreate"}}
    mounts = [{"name": "models", "mountPath": "/models"}]
    head = {
        # Serve's proxy stays on the head (proxy_location: HeadOnly); model work goes to the workers.
        "rayStartParams": _start_params(**{"num-cpus": "0", "dashboard-host": "0.0.0.0"}),
        "template": _pod(_container(image, {"cpu": "1", "memory": "2Gi"}, head=True, serve_ready=False,
                                    volume_mounts=mounts), [models]),
    }
    worker = {
        "groupName": "cpu",
        # TP=2 x PP=2: a stage's two workers share a pod (STRICT_PACK), the stages take one pod each.
        "replicas": 2, "minReplicas": 2, "maxReplicas": 2,
        "rayStartParams": _start_params(),
        "template": _pod(_container(image, {"cpu": "2", "memory": "4Gi"}, head=False, serve_ready=False,
                                    volume_mounts=mounts), [models]),
    }
    serve_config = yaml.safe_dump(tiny_cpu_serve_config(), sort_keys=False)
    return [rayservice("raypp-tiny-cpu", serve_config, head, worker)]


def monitoring() -> list[dict]:
    """One PodMonitor for every Ray pod of every raypp RayService: head and workers alike, since
    each node's metrics agent serves only what that node's processes recorded.  (A ServiceMonitor
    on the head Service would scrape the head twice: a RayService has two head Services, its own
    and its current RayCluster's, and every raypp series would be counted double.)"""
    return [{
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
        "metadata": {"name": "raypp", "labels": {**NAME_LABEL, "release": "prometheus"}},
        "spec": {"jobLabel": "app.kubernetes.io/name",
                 "namespaceSelector": {"any": True},
                 "selector": {"matchLabels": {**NAME_LABEL, "ray.io/is-ray-node": "yes"}},
                 "podMetricsEndpoints": [{"port": "metrics", "interval": "15s"}],
                 "podTargetLabels": ["ray.io/cluster", "ray.io/node-type"]},
    }]


def dashboard_configmap() -> list[dict]:
    dashboard = json.loads((REPO / "dashboards" / "raypp.json").read_text())
    return [{
        "apiVersion": "v1", "kind": "ConfigMap",
        # Grafana's sidecar (kube-prometheus-stack) loads every ConfigMap with this label.
        "metadata": {"name": "raypp-grafana-dashboard", "labels": {**NAME_LABEL, "grafana_dashboard": "1"}},
        "data": {"raypp.json": json.dumps(dashboard, indent=2, sort_keys=True) + "\n"},
    }]


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:
        return True   # plain YAML: no &anchors for the dicts two containers share


def _str(dumper: yaml.SafeDumper, value: str):
    # Multi-line strings (the serve config, the dashboard) as readable literal blocks.
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)

FILES = {
    "raypp-70b-tp8-pp2.yaml": gpu_70b,
    "raypp-tiny-cpu.yaml": cpu_tiny,
    "monitoring.yaml": monitoring,
    "grafana-dashboard.yaml": dashboard_configmap,
}


def render(name: str) -> str:
    header = "# Generated by k8s/generate.py; edit that (or its sources), not this file.\n"
    return header + yaml.dump_all(FILES[name](), Dumper=_Dumper, sort_keys=False, explicit_start=True, width=120)


def main() -> None:
    for name in FILES:
        (OUT / name).write_text(render(name))
        print(f"wrote {OUT / name}")


if __name__ == "__main__":
    main()
