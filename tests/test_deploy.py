"""`sonogen deploy`: the InferenceService of a registered model, with the image, GPU, probes, timeout and autoscaling
its runtime needs, valid as a KServe v1beta1 object and as a Pod, and parsed by the predictor's own arguments."""

from __future__ import annotations

from importlib.metadata import version

import mlflow
import pytest
import yaml
from typer.testing import CliRunner

from conftest import NAME
from sonogen.cli import app
from sonogen.deploy import inference_service
from test_infra import K8S_VERSIONS, check_kserve_type, parse_serve_args, pod_spec_fields

VERSION = version("sonogen")


@pytest.fixture(scope="module")
def aliases(registry):
    """Two aliases of the registry's model: v1 is exported to ONNX, v2 samples with torch."""
    client = mlflow.MlflowClient(registry["uri"])
    client.set_registered_model_alias(NAME, "deploy-onnx", "1")
    client.set_registered_model_alias(NAME, "deploy-torch", "2")
    return registry


def deployed(registry, tmp_path, *args):
    result = CliRunner().invoke(app, ["deploy", NAME, "--out", str(tmp_path / "deploy"), *args],
                                env={"MLFLOW_TRACKING_URI": registry["uri"]})
    assert result.exit_code == 0, result.output
    kustomization = yaml.safe_load((tmp_path / "deploy" / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["inferenceservice.yaml"] and kustomization["namespace"] == "sonogen"
    return yaml.safe_load((tmp_path / "deploy" / "inferenceservice.yaml").read_text()), result.output


def test_an_exported_gan_is_served_by_the_slim_image_and_a_torch_model_by_the_gpu_image(aliases, tmp_path):
    onnx, output = deployed(aliases, tmp_path / "onnx", "--alias", "deploy-onnx", "--node-selector",
                            "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3")
    assert "kubectl apply -k" in output
    predictor = onnx["spec"]["predictor"]
    [container] = predictor["containers"]
    assert container["image"] == f"ghcr.io/sonogen/sonogen-serve:{VERSION}"
    assert container["args"] == ["--model", NAME, "--alias", "deploy-onnx", "--watch", "60"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert predictor["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert predictor["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    torch_model, _ = deployed(aliases, tmp_path / "torch", "--alias", "deploy-torch", "--device", "cpu")
    predictor = torch_model["spec"]["predictor"]
    [container] = predictor["containers"]
    assert container["image"] == f"ghcr.io/sonogen/sonogen-serve-gpu:{VERSION}"
    assert "nvidia.com/gpu" not in container["resources"]["limits"] and "tolerations" not in predictor
    # a torch model loads slower and answers fewer requests at once than an exported GAN
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800
    assert predictor["timeout"] > onnx["spec"]["predictor"]["timeout"]
    assert predictor["scaleMetric"] == "concurrency" and predictor["scaleTarget"] < 32


@pytest.mark.parametrize("runtime, device", [("onnx", "gpu"), ("torch", "gpu"), ("torch", "cpu")])
def test_the_manifest_is_a_valid_inference_service_and_pod_the_predictor_parses(runtime, device, monkeypatch, capsys):
    import kserve.models
    import kubernetes_validate

    isvc = inference_service("lus-ldm-consolidation", "champion", runtime, VERSION, device, {"pool": "gpu"})
    check_kserve_type(isvc, "V1beta1InferenceService", "deployed", kserve.models)
    spec = isvc["spec"]["predictor"]
    for k8s in K8S_VERSIONS:
        fields = pod_spec_fields(k8s)
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": isvc["metadata"],
               "spec": {k: v for k, v in spec.items() if k in fields}}
        kubernetes_validate.validate(pod, k8s, strict=True)
    args = parse_serve_args(spec["containers"][0], monkeypatch, capsys)
    assert (args.model, args.alias, args.watch, args.precision) == ("lus-ldm-consolidation", "champion", 60.0, None)


def test_a_torch_predictor_can_sample_in_bf16_by_default_and_an_onnx_one_cannot(monkeypatch, capsys):
    isvc = inference_service("lus-ldm-consolidation", "champion", "torch", VERSION, precision="bf16")
    assert parse_serve_args(isvc["spec"]["predictor"]["containers"][0], monkeypatch, capsys).precision == "bf16"
    with pytest.raises(ValueError, match="an ONNX export at the precision it was exported in"):
        inference_service("lus-dcgan-consolidation", "champion", "onnx", VERSION, precision="bf16")


def test_names_kubernetes_refuses_and_missing_aliases_are_clear_errors(aliases, tmp_path):
    with pytest.raises(ValueError, match="is not a Kubernetes object name"):
        inference_service("lus-sinddm-pneumonia-Pneu.JPG_1", "champion", "torch", VERSION)
    result = CliRunner().invoke(app, ["deploy", NAME, "--alias", "nobody", "--out", str(tmp_path)],
                                env={"MLFLOW_TRACKING_URI": aliases["uri"]})
    assert result.exit_code == 1 and "does not exist" in result.output
