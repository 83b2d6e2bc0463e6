"""The Kubeflow training pipeline: its compiled IR against a golden file, its cluster wiring, and a real local
run with kfp.local that trains, gates and registers on the phantom."""

import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import mlflow
import pytest
import yaml

from pipelines.training import arguments_from_params
from sonogen.data.manifest import MANIFEST, file_sha256

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "training_pipeline.yaml"
IMAGE = f"ghcr.io/sonogen/sonogen-train:{version('sonogen')}"
TINY_PARAMS = {
    "dataset": {"name": "lus", "raw": "data/raw/phantom"},
    "phantom": {"patients": 8, "frames_per_patient": 2, "seed": 0, "consolidation_fraction": 0.5},
    "prepare": {"size": 32, "split": "0.7,0.15,0.15", "seed": 0, "split_method": "stratify"},
    "train": {"families": ["dcgan"], "labels": ["consolidation", "normal"],
              "dcgan": {"model": {"image_size": 32, "base_channels": 4},
                        "train": {"epochs": 1, "batch_size": 2, "eval_samples": 2}}},
    "evaluate": {"samples": 8, "encoder_epochs": 1, "downstream": {"seeds": 3, "epochs": 1, "bootstrap": 100}},
    "gates": {"dcgan": {"extractor": "us-encoder", "max_near_copy_fraction": 0.5}},
}


def sonogen(*args, cwd, env=None):
    environment = {k: v for k, v in os.environ.items() if k not in ("SONOGEN_IMAGE", "MLFLOW_TRACKING_URI")}
    environment.update(env or {})
    result = subprocess.run([sys.executable, "-m", "sonogen.cli", *args], cwd=cwd, env=environment,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"sonogen {args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compiled") / "training_pipeline.yaml"
    sonogen("pipeline", "compile", "-o", str(out), cwd=REPO)
    return out


def test_compiled_pipeline_matches_the_golden_file(compiled):
    # parsed, not as text: the compiler's header comment lists dict defaults in no fixed key order
    assert list(yaml.safe_load_all(compiled.read_text())) == list(yaml.safe_load_all(GOLDEN.read_text())), (
        "the compiled pipeline changed; review the difference and refresh the golden file with "
        "`sonogen pipeline compile -o tests/golden/training_pipeline.yaml`")


def test_training_and_gates_request_a_gpu_and_every_task_gets_cluster_credentials(compiled):
    spec, platform = yaml.safe_load_all(compiled.read_text())
    executors = spec["deploymentSpec"]["executors"]
    gpu = {name: e["container"]["resources"].get("accelerator") for name, e in executors.items()
           if "accelerator" in e["container"].get("resources", {})}
    one_gpu = {"count": "1", "resourceCount": "1", "resourceType": "nvidia.com/gpu", "type": "nvidia.com/gpu"}
    # the family × label loop (a family's prerequisites train in its task), each member of a pool, the encoder, the
    # gates (of the three loops); the task that submits a TrainJob asks for none: the job's pods have the GPUs
    assert gpu == {name: one_gpu for name in ("exec-train-generator", "exec-train-pool-member", "exec-train-encoder",
                                              "exec-evaluate-gates", "exec-evaluate-gates-2", "exec-evaluate-gates-3")}
    assert {e["container"]["image"] for e in executors.values()} == {IMAGE}
    kubernetes = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(kubernetes) == set(executors)
    for config in kubernetes.values():
        assert {s["secretName"] for s in config["secretAsEnv"]} == {"sonogen-s3"}
        assert {c["configMapName"] for c in config["configMapAsEnv"]} == {"sonogen-env"}
    dag = spec["root"]["dag"]["tasks"]
    assert dag["for-loop-1"]["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--runs"
    body = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]
    assert body["condition-2"]["triggerPolicy"]["condition"].endswith("== true")
    assert body["train-generator"]["retryPolicy"]["maxRetryCount"] == 2


def test_runs_are_derived_from_the_families_and_the_labels_they_train(tmp_path):
    params = {**TINY_PARAMS, "train": {**TINY_PARAMS["train"], "families": ["dcgan", "diffultra"]}}
    arguments = arguments_from_params(yaml.safe_dump(params))
    # diffultra draws lesions into normal frames: it declines that label, and builds its bank and ldm itself
    assert arguments["runs"] == [{"family": "dcgan", "label": "consolidation"}, {"family": "dcgan", "label": "normal"},
                                 {"family": "diffultra", "label": "consolidation"}]
    assert "diffultra_label" not in arguments
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    sonogen("pipeline", "compile", "-o", str(tmp_path / "p.yaml"), "--params", str(tmp_path / "params.yaml"), cwd=REPO)
    spec, _ = yaml.safe_load_all((tmp_path / "p.yaml").read_text())
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert defaults["runs"]["defaultValue"] == arguments["runs"]
    assert "defaultValue" not in defaults["params"]  # the params text is given with each run


def test_runs_of_more_than_one_gpu_go_to_kubeflow_trainer_and_the_compiled_pipeline_shows_the_switch(tmp_path):
    train = TINY_PARAMS["train"]
    params = {**TINY_PARAMS, "train": {**train, "families": ["dcgan", "ldm"], "labels": ["consolidation"], "ldm": {
        "model": {"image_size": 32}, "train": {"epochs": 1, "nodes": 2, "gpus_per_node": 4}}}}
    arguments = arguments_from_params(yaml.safe_dump(params))
    assert arguments["runs"] == [{"family": "dcgan", "label": "consolidation"}]
    assert arguments["trainer_runs"] == [{"family": "ldm", "label": "consolidation", "nodes": 2, "gpus_per_node": 4}]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    sonogen("pipeline", "compile", "-o", str(tmp_path / "p.yaml"), "--params", str(tmp_path / "params.yaml"), cwd=REPO)
    spec, platform = yaml.safe_load_all((tmp_path / "p.yaml").read_text())
    assert spec["root"]["inputDefinitions"]["parameters"]["trainer_runs"]["defaultValue"] == arguments["trainer_runs"]
    loop = spec["root"]["dag"]["tasks"]["for-loop-3"]
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--trainer_runs"
    task = spec["components"]["comp-for-loop-3"]["dag"]["tasks"]["train-on-trainer"]
    inputs = task["inputs"]["parameters"]
    assert inputs["nodes"]["componentInputParameter"] == "pipelinechannel--trainer_runs-loop-item"
    assert inputs["nodes"]["parameterExpressionSelector"] == "parseJson(string_value)[\"nodes\"]"
    assert inputs["image"]["runtimeValue"]["constant"] == IMAGE  # the TrainJob's pods run this task's image
    executor = spec["deploymentSpec"]["executors"]["exec-train-on-trainer"]["container"]
    assert "accelerator" not in executor["resources"] and executor["image"] == IMAGE
    assert "train_on_trainer" in " ".join(executor["command"])
    kubernetes = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train-on-trainer"]
    assert {s["secretName"] for s in kubernetes["secretAsEnv"]} == {"sonogen-s3"}  # it stages params and model


def test_a_pooled_family_trains_a_task_per_member_image_in_the_compiled_pipeline(tmp_path):
    train = TINY_PARAMS["train"]
    params = {**TINY_PARAMS, "train": {**train, "families": ["dcgan", "sinddmpool"], "labels": ["consolidation"]}}
    arguments = arguments_from_params(yaml.safe_dump(params))
    assert arguments["runs"] == [{"family": "dcgan", "label": "consolidation"}]
    assert arguments["pool_runs"] == [{"family": "sinddmpool", "label": "consolidation"}]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    sonogen("pipeline", "compile", "-o", str(tmp_path / "p.yaml"), "--params", str(tmp_path / "params.yaml"), cwd=REPO)
    spec, _ = yaml.safe_load_all((tmp_path / "p.yaml").read_text())
    [outer] = [name for name, task in spec["root"]["dag"]["tasks"].items()
               if task.get("parameterIterator", {}).get("items") == {"inputParameter": "pipelinechannel--pool_runs"}]
    tasks = spec["components"][f"comp-{outer}"]["dag"]["tasks"]
    [inner] = [name for name, task in tasks.items() if "parameterIterator" in task]
    # the members loop runs over the images the pool_members task chose, then one task joins what they trained
    assert tasks[inner]["parameterIterator"]["items"] == {"inputParameter": "pipelinechannel--pool-members-Output"}
    assert "train-pool-member" in spec["components"][f"comp-{inner}"]["dag"]["tasks"]
    members = tasks["pool-trained-members"]["inputs"]["artifacts"]["members"]["taskOutputArtifact"]
    assert members == {"outputArtifactKey": "pipelinechannel--train-pool-member-model", "producerTask": inner}
    resources = spec["deploymentSpec"]["executors"]["exec-train-pool-member"]["container"]["resources"]
    assert resources["accelerator"]["resourceCount"] == "1"  # one GPU per member
    too_big = {**params, "train": {**params["train"], "sinddmpool": {"train": {"nodes": 2}}}}
    with pytest.raises(ValueError, match="a task of one GPU"):
        arguments_from_params(yaml.safe_dump(too_big))


def test_local_run_of_a_pooled_family_trains_its_members_as_tasks_then_pools_gates_and_registers(tmp_path):
    params = {**TINY_PARAMS,
              "train": {"families": ["sinddmpool"], "labels": ["consolidation"],
                        "sinddmpool": {"model": {"coarsest_area": 100, "coarsest_side": [8, 12], "timesteps": 20,
                                                 "channels": 16, "max_images": 2},
                                       "train": {"epochs": 1, "steps_per_epoch": 4, "batch_size": 2,
                                                 "eval_samples": 2}}},
              "evaluate": {"samples": 4, "few_image_samples": 4, "encoder_epochs": 1, "downstream": None},
              "gates": {}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = sonogen("pipeline", "run", "--params", "params.yaml", cwd=tmp_path)
    assert "registered lus-sinddmpool-consolidation version 1 @candidate (gate passed)" in out
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = client.get_model_version("lus-sinddmpool-consolidation", "1")
    member_runs = client.get_run(version.run_id).data.tags["pooled_runs"].split(",")
    assert len(member_runs) == 2  # one task each: the members' own runs, of the family the pool pools
    for run_id in member_runs:
        run = client.get_run(run_id)
        assert run.data.tags["family"] == "sinddm" and run.data.params["train.steps_per_epoch"] == "2"
    [listed] = (tmp_path / ".kfp").rglob("pool-members/executor_output.json")
    sources = [item["source"] for item in json.loads(listed.read_text())["parameterValues"]["Output"]]
    assert version.tags["training_images"] == ",".join(sources)  # in the order the pool chose them


def test_the_component_image_is_the_one_the_dockerfile_builds(compiled, tmp_path):
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM .* AS train$", dockerfile, re.M)
    assert f"ghcr.io/sonogen/sonogen-train:<version>" in dockerfile
    assert 'ENTRYPOINT ["sonogen"]' in dockerfile
    other = tmp_path / "other.yaml"
    sonogen("pipeline", "compile", "-o", str(other), "--image", "registry.example/sonogen-train:1.2", cwd=REPO)
    images = {e["container"]["image"] for e in next(yaml.safe_load_all(other.read_text()))["deploymentSpec"]
              ["executors"].values()}
    assert images == {"registry.example/sonogen-train:1.2"}


def test_local_run_trains_gates_and_registers_like_dvc(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    out = sonogen("pipeline", "run", "--params", "params.yaml", cwd=tmp_path)
    for label in ("consolidation", "normal"):
        assert f"registered lus-dcgan-{label} version 1 @candidate (gate passed)" in out
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    version_1 = client.get_model_version("lus-dcgan-normal", "1")
    assert version_1.tags["gate.extractor"] == "lus-us-encoder@1"
    assert version_1.tags["onnx_artifact"].endswith(".onnx")  # exported as registered: the slim image serves it
    assert client.get_registered_model("lus-dcgan-normal").aliases == {"candidate": 1}
    reports = list((tmp_path / ".kfp").rglob("gate_report.md"))
    assert len(reports) == 2

    # the pipeline's prepared data is what the DVC stages' commands make from the same parameters
    phantom, prepare = TINY_PARAMS["phantom"], TINY_PARAMS["prepare"]
    sonogen("data", "phantom", "raw", "--patients", str(phantom["patients"]), "--frames-per-patient",
            str(phantom["frames_per_patient"]), "--seed", "0", "--consolidation-fraction", "0.5", cwd=tmp_path)
    sonogen("data", "prepare", "raw", "prepared", "--size", "32", "--split", prepare["split"], "--seed", "0",
            "--stratify", cwd=tmp_path)
    [pipeline_manifest] = (tmp_path / ".kfp").rglob(f"prepare-data/prepared/{MANIFEST}")
    assert file_sha256(pipeline_manifest) == file_sha256(tmp_path / "prepared" / MANIFEST)


def test_local_run_of_diffultra_builds_its_bank_and_ldm_in_its_task_then_gates_and_registers(tmp_path):
    tiny_train = {"epochs": 1, "steps_per_epoch": 2, "batch_size": 2, "eval_samples": 2, "precision": "fp32"}
    params = {**TINY_PARAMS,
              "train": {"families": ["diffultra"], "labels": ["consolidation"],
                        "ldm": {"model": {"image_size": 32, "vae_channels": [8, 16], "unet_channels": [16, 32],
                                          "embedding_dim": 16, "vae_steps": 1, "steps": 2}, "train": tiny_train},
                        "diffultra": {"model": {"image_size": 32, "steps": 2}, "train": tiny_train}},
              "lesion_bank": {"label": "consolidation"},
              "evaluate": {"samples": 4, "encoder_epochs": 1, "downstream": None, "detection_seeds": 2,
                           "detection_steps": 2},
              "gates": {"diffultra": {"min_detection_ap50_delta": -1.0}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = sonogen("pipeline", "run", "--params", "params.yaml", cwd=tmp_path)
    assert "registered lus-diffultra-consolidation version 1 @candidate (gate passed)" in out
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_registered_model("lus-diffultra-consolidation").aliases == {"candidate": 1}
    assert "onnx_artifact" not in client.get_model_version("lus-diffultra-consolidation", "1").tags  # a loop
    [bank_run] = client.search_runs([client.get_experiment_by_name("lus-lesion-bank").experiment_id])
    assert bank_run.data.metrics["bank.lesions"] >= 1
    [report] = (tmp_path / ".kfp").rglob("gate_report.md")
    assert "## Lesion detection" in report.read_text()


def test_local_run_of_lesion_pairs_trains_its_ldm_in_its_task_then_gates_and_registers(tmp_path):
    tiny_train = {"epochs": 1, "steps_per_epoch": 2, "batch_size": 2, "eval_samples": 2, "precision": "fp32"}
    params = {**TINY_PARAMS,
              "train": {"families": ["lesionpairs"], "labels": ["consolidation", "normal"],
                        "ldm": {"model": {"image_size": 32, "vae_channels": [8, 16], "unet_channels": [16, 32],
                                          "embedding_dim": 16, "vae_steps": 1, "steps": 2}, "train": tiny_train},
                        "lesionpairs": {"model": {"image_size": 32, "steps": 2}, "train": tiny_train}},
              "evaluate": {"samples": 4, "encoder_epochs": 1, "downstream": None},
              "gates": {"lesionpairs": {"min_mask_dice_gain": -1.0}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = sonogen("pipeline", "run", "--params", "params.yaml", cwd=tmp_path)
    assert "registered lus-lesionpairs-consolidation version 1 @candidate (gate passed)" in out
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    registered = {m.name for m in client.search_registered_models()}
    assert "lus-lesionpairs-consolidation" in registered and "lus-lesionpairs-normal" not in registered  # declined
    [report] = (tmp_path / ".kfp").rglob("gate_report.json")
    assert {"mask_dice", "mask_dice_gain"} <= set(json.loads(report.read_text())["metrics"])
