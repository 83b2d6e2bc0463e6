"""``sonogen deploy MODEL``: the KServe InferenceService that serves a registered model's alias, written as a
kustomization (``kubectl apply -k OUT``) in the shape of ``infra/serving`` (the same settings, credentials, probes
and security), with what the registry says of the model filled in:

- the image its runtime needs: the slim ``serve`` image for a GAN exported to ONNX (ONNX Runtime, CUDA or CPU), the
  ``serve-gpu`` image (CUDA torch, diffusers) for every other family;
- on a GPU (``device="gpu"``): one ``nvidia.com/gpu``, the toleration of GPU nodes' taint and the node selector given;
- a startup probe that waits for a large model's download (a diffusion model's image and weights are GBs), a request
  timeout above the slowest request the server accepts, and KServe's concurrency target for autoscaling (a GAN
  answers many requests at once, a diffusion model a few).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from sonogen.backends import TORCH_PRECISIONS
from sonogen.export import ONNX_TAG

NAMESPACE = "sonogen"
IMAGES = {"onnx": "ghcr.io/sonogen/sonogen-serve", "torch": "ghcr.io/sonogen/sonogen-serve-gpu"}
# per runtime: resources, how long the first load may take (probe period × failures), the slowest request
# (--max-n 256 images; a diffusion model's 20–50 steps each), and the requests a replica takes at once
RUNTIMES = {
    "onnx": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "4", "memory": "4Gi"},
             "startup": (10, 30), "timeout": 120, "concurrency": 32},
    "torch": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"cpu": "8", "memory": "32Gi"},
              "startup": (20, 90), "timeout": 900, "concurrency": 4},
}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _probe(path: str, period: int, failures: int, delay: int = 0) -> dict:
    probe = {"httpGet": {"path": path, "port": 8080}, "periodSeconds": period, "timeoutSeconds": 5,
             "failureThreshold": failures}
    return {**probe, "initialDelaySeconds": delay} if delay else probe


def _secret(name: str, secret: str) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": name}}}


def inference_service(name: str, alias: str, runtime: str, version: str, device: str = "gpu",
                      node_selector: dict[str, str] | None = None, min_replicas: int = 1,
                      max_replicas: int = 2, precision: str | None = None) -> dict[str, Any]:
    """The InferenceService serving ``models:/NAME@ALIAS`` with ``runtime`` (``onnx`` or ``torch``) on ``device``
    (``gpu`` or ``cpu``), in the image of sonogen ``version``; ``precision`` (torch: fp32 or bf16) is what
    requests that name none are sampled at."""
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name):
        raise ValueError(f"{name!r} is not a Kubernetes object name (lower-case letters, digits and '-', at most 63); "
                         f"register the model under such a name to deploy it")
    if device not in ("gpu", "cpu") or runtime not in RUNTIMES:
        raise ValueError(f"device must be gpu or cpu, got {device!r}")
    if not 1 <= min_replicas <= max_replicas:
        raise ValueError("min_replicas must be at least 1 (a warm replica watches the alias) and at most max_replicas")
    if precision is not None and (runtime != "torch" or precision not in TORCH_PRECISIONS):
        raise ValueError(f"--precision {precision}: a torch-served model samples at fp32 or bf16; an ONNX export "
                         f"at the precision it was exported in (sonogen export onnx --precision)")
    settings = RUNTIMES[runtime]
    limits = {**settings["limits"], **({"nvidia.com/gpu": 1} if device == "gpu" else {})}
    period, failures = settings["startup"]
    container = {
        "name": "kserve-container",
        "image": f"{IMAGES[runtime]}:{version}",
        "args": ["--model", name, "--alias", alias, "--watch", "60", *(["--precision", precision] if precision else [])],
        "ports": [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}],
        "envFrom": [{"configMapRef": {"name": "sonogen-env"}}],
        "env": [_secret("AWS_ACCESS_KEY_ID", "sonogen-s3"), _secret("AWS_SECRET_ACCESS_KEY", "sonogen-s3"),
                _secret("SONOGEN_SERVE_TOKEN", "sonogen-serve")],
        "resources": {"requests": dict(settings["requests"]), "limits": limits},
        # the first load downloads the model; liveness and readiness start once it answers
        "startupProbe": _probe("/v2/health/live", period, failures),
        "readinessProbe": _probe("/v2/health/ready", 10, 3),
        "livenessProbe": _probe("/v2/health/live", 20, 3),
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
                            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                            "seccompProfile": {"type": "RuntimeDefault"}},
    }
    predictor: dict[str, Any] = {
        "minReplicas": min_replicas, "maxReplicas": max_replicas,
        "scaleMetric": "concurrency", "scaleTarget": settings["concurrency"],
        "timeout": settings["timeout"],
        "automountServiceAccountToken": False,
        "containers": [container],
    }
    if device == "gpu":
        predictor["tolerations"] = [GPU_TOLERATION]
    if node_selector:
        predictor["nodeSelector"] = dict(node_selector)
    labels = {"app.kubernetes.io/name": "sonogen-serve", "app.kubernetes.io/component": "predictor",
              "app.kubernetes.io/instance": name}
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels}, "spec": {"predictor": predictor}}


def deploy(model: str, out: str | Path, alias: str = "champion", device: str = "gpu",
           node_selector: dict[str, str] | None = None, min_replicas: int = 1, max_replicas: int = 2,
           precision: str | None = None) -> dict:
    """Writes ``OUT/inferenceservice.yaml`` and ``OUT/kustomization.yaml`` for the registered model ``model`` (a
    name, or ``models:/NAME@ALIAS``), whose alias must exist; returns what was chosen."""
    from importlib.metadata import version as installed

    from sonogen.registry import model_name_of, model_version, resolve_version

    if model.startswith("models:/"):
        if "@" not in model:
            raise ValueError(f"{model}: deploy an alias (models:/NAME@ALIAS), which the predictor follows")
        name, alias = model_name_of(model), model.partition("@")[2]
    else:
        name = model
    _, number = resolve_version(f"models:/{name}@{alias}")
    tags = model_version(name, number).tags
    runtime = "onnx" if ONNX_TAG in tags else "torch"
    manifest = inference_service(name, alias, runtime, installed("sonogen"), device, node_selector, min_replicas,
                                 max_replicas, precision)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"# sonogen deploy {name} --alias {alias} --device {device}: version {number} now "
              f"({tags.get('family', 'unknown family')}, {runtime}); the predictor follows the alias\n")
    (out / "inferenceservice.yaml").write_text(header + yaml.safe_dump(manifest, sort_keys=False))
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "namespace": NAMESPACE, "labels": [{"pairs": {"app.kubernetes.io/part-of": "sonogen"}}],
                     "resources": ["inferenceservice.yaml"]}
    (out / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    return {"name": name, "alias": alias, "version": number, "family": tags.get("family"), "runtime": runtime,
            "image": manifest["spec"]["predictor"]["containers"][0]["image"], "device": device, "out": str(out)}
