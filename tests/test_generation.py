"""Sharded bulk generation: K workers draw disjoint parts of one synthetic dataset, a merge joins them, and the set
equals a one-worker run's; the sonogen-generate pipeline does that with kfp.local; conditions are checked; synthetic
patients never collide with real ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import NAME
from test_latent_diffusion import tiny_sd  # noqa: F401  (a fixture)
from sonogen.cli import app
from sonogen.data.manifest import SYNTHETIC_PATIENT, read_manifest

REPO = Path(__file__).resolve().parents[1]


def generate(registry, out, *args, version="1"):
    return CliRunner().invoke(app, ["generate", "--model", f"models:/{NAME}/{version}", "-n", "10", "--out", str(out),
                                    "--seed", "3", "--batch", "3", *args], env={"MLFLOW_TRACKING_URI": registry["uri"]})


def dataset(folder: Path) -> dict[str, bytes]:
    return {record.image: (folder / record.image).read_bytes() for record in read_manifest(folder)}


@pytest.mark.parametrize("version", ["1", "2"])  # ONNX Runtime (exported) and torch
def test_shards_draw_disjoint_parts_that_merge_into_the_one_worker_set(registry, tmp_path, version):
    whole = generate(registry, tmp_path / "whole", version=version)
    assert whole.exit_code == 0, whole.output
    out = tmp_path / "sharded"
    first = generate(registry, out, "--shards", "2", "--shard", "0", version=version)
    assert first.exit_code == 0 and "shard 0 of 2: 6 images" in first.output, first.output  # chunks 0 and 2
    early = generate(registry, out, "--shards", "2", "--merge", version=version)
    assert early.exit_code == 1 and "shard(s) [1] of 2 have not finished" in early.output
    assert generate(registry, out, "--shards", "2", "--shard", "1", version=version).exit_code == 0
    merged = generate(registry, out, "--shards", "2", "--merge", version=version)
    assert merged.exit_code == 0 and "merged 2 shards: 10 images" in merged.output, merged.output
    assert dataset(out) == dataset(tmp_path / "whole")  # the same images, whoever drew them
    records = read_manifest(out)
    patients = [record.patient_id for record in records]
    assert len(set(patients)) == 10 and all(p.startswith(SYNTHETIC_PATIENT) for p in patients)
    assert patients[0] == f"{SYNTHETIC_PATIENT}{NAME}-v{version}-s3-0000000"


def test_a_condition_is_checked_against_the_model_before_anything_is_drawn(registry, tmp_path):
    bad_key = generate(registry, tmp_path / "a", "--condition", '{"size_bias": "large"}')
    assert bad_key.exit_code == 1 and "does not take ['size_bias']; it takes ['label']" in bad_key.output
    bad_label = generate(registry, tmp_path / "b", "--condition", '{"label": "normal"}')
    assert bad_label.exit_code == 1 and "label 'normal' is not one of ['consolidation']" in bad_label.output
    not_json = generate(registry, tmp_path / "c", "--condition", "{label")
    assert not_json.exit_code == 1 and "--condition: not JSON" in not_json.output
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").rglob("*.png"))
    labelled = generate(registry, tmp_path / "d", "--condition", '{"label": "consolidation"}', version="2")
    assert labelled.exit_code == 0, labelled.output
    assert json.loads((tmp_path / "d" / "generate.json").read_text())["condition"] == {"label": "consolidation"}


def saved_dcgan(folder: Path) -> Path:
    from sonogen.generators.dcgan import DCGAN, DCGANConfig

    torch.manual_seed(0)
    return DCGAN(DCGANConfig(label="consolidation", image_size=16, base_channels=4)).save(folder)


@pytest.mark.parametrize("ahead", [1, 2])  # chunks drawn at once: 2 is a GPU's default
def test_a_failed_write_stops_generation_keeps_what_was_written_and_a_rerun_completes_the_same_set(tmp_path,
                                                                                                monkeypatch, ahead):
    """A chunk is written while the next are drawn: an error in the writing still stops the run at once."""
    from sonogen.generate import Destination, generate_dataset

    folder = saved_dcgan(tmp_path / "generator")
    generate_dataset(str(folder), 10, str(tmp_path / "whole"), seed=3, batch=3)
    ahead_set = generate_dataset(str(folder), 10, str(tmp_path / "ahead"), seed=3, batch=3, draw_ahead=3)
    assert ahead_set["images"] == 10 and dataset(tmp_path / "ahead") == dataset(tmp_path / "whole")
    assert read_manifest(tmp_path / "ahead") == read_manifest(tmp_path / "whole")
    write = Destination.write

    def disk_full_at_image_7(self, name, data):
        if name == "images/0000007.png":
            raise OSError("No space left on device")
        write(self, name, data)

    monkeypatch.setattr(Destination, "write", disk_full_at_image_7)
    out = tmp_path / "interrupted"
    with pytest.raises(OSError, match="No space left"):
        generate_dataset(str(folder), 10, str(out), seed=3, batch=3, draw_ahead=ahead)
    written = sorted(path.name for path in (out / "images").iterdir())
    assert written == [f"{i:07d}.png" for i in range(7)] and not (out / "manifest.csv").exists()
    monkeypatch.setattr(Destination, "write", write)
    rerun = generate_dataset(str(folder), 10, str(out), seed=3, batch=3, draw_ahead=ahead)
    assert rerun["skipped_chunks"] == 2 and rerun["images"] == 10  # chunk 2 was half written: drawn again
    assert dataset(out) == dataset(tmp_path / "whole")


def test_a_saved_generator_folder_generates_without_a_tracking_client(tmp_path):
    """What a GPU machine with torch alone runs: `generate --model FOLDER` imports no mlflow."""
    folder = saved_dcgan(tmp_path / "generator")
    script = ("import sys; sys.modules['mlflow'] = None\n"  # any `import mlflow` now fails
              "from sonogen.generate import generate_dataset\n"
              f"print(generate_dataset({str(folder)!r}, 5, {str(tmp_path / 'set')!r}, batch=2)['images'])")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("5"), done.stderr[-2000:]
    assert len(read_manifest(tmp_path / "set")) == 5


def test_a_real_import_refuses_patient_ids_that_mark_synthetic_images(tmp_path):
    from sonogen.data.writer import DatasetWriter

    with pytest.raises(ValueError, match="starts with 'synthetic-', which marks generated images"):
        with DatasetWriter(tmp_path / "out", source="test") as writer:
            writer.add_file("a.png", lambda: [], label="normal", patient_id="synthetic-x", licence="CC BY 4.0")


def test_the_generate_pipeline_draws_two_shards_with_kfp_local_into_the_one_worker_set(registry, tmp_path):
    out, whole = tmp_path / "sharded", tmp_path / "whole"
    assert generate(registry, whole).exit_code == 0
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["uri"]}
    env.pop("SONOGEN_IMAGE", None)
    run = subprocess.run([sys.executable, "-m", "sonogen.cli", "pipeline", "run", "--pipeline", "generate", "--model",
                          f"models:/{NAME}/1", "--n", "10", "--seed", "3", "--batch", "3", "--shards", "2", "--out",
                          str(out), "--pipeline-root", str(tmp_path / "kfp")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert dataset(out) == dataset(whole)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["0000-of-0002.csv", "0001-of-0002.csv"]


def test_the_compiled_generate_pipeline_fans_out_over_shards_on_gpus_then_merges(tmp_path):
    package = tmp_path / "generate.yaml"
    done = CliRunner().invoke(app, ["pipeline", "compile", "--pipeline", "generate", "-o", str(package)])
    assert done.exit_code == 0, done.output
    spec, platform = yaml.safe_load_all(package.read_text())
    loop = spec["root"]["dag"]["tasks"]["for-loop-1"]
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--shards"
    merge = spec["root"]["dag"]["tasks"]["merge-generated"]
    assert merge["dependentTasks"] == ["for-loop-1"]
    resources = spec["deploymentSpec"]["executors"]["exec-generate-shard"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-merge-generated"]["container"]["resources"]
    kubernetes = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert {s["secretName"] for s in kubernetes["exec-generate-shard"]["secretAsEnv"]} == {"sonogen-s3"}


def test_a_folder_of_masks_conditions_each_image_and_the_set_is_image_mask_pairs(tiny_sd, tmp_path, s3_server,
                                                                                    aws_env):
    import base64

    import numpy as np
    from PIL import Image

    from sonogen.backends import load_backend
    from sonogen.generate import generate_dataset
    from sonogen.generators.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
    from sonogen.sampling import chunk_seed

    torch.manual_seed(0)
    folder = LatentDiffusion(LatentDiffusionConfig(label="consolidation", mode="controlnet", base_model=str(tiny_sd),
                                                   image_size=32, steps=2)).save(tmp_path / "controlnet")
    masks = tmp_path / "masks"
    masks.mkdir()
    for k, (top, left) in enumerate([(4, 4), (16, 12), (8, 20)]):
        mask = np.zeros((32, 32), np.uint8)
        mask[top:top + 10, left:left + 8] = 255
        Image.fromarray(mask).save(masks / f"lesion-{k}.png")
    out = tmp_path / "pairs"
    result = generate_dataset(str(folder), 4, str(out), seed=2, batch=3, per_image=("mask", masks))
    assert result["condition_files"] == {"key": "mask", "files": 3, "sha256": result["condition_files"]["sha256"]}
    records = read_manifest(out)
    assert [r.mask for r in records] == [f"masks/{k:07d}.png" for k in range(4)]
    assert (out / records[3].mask).read_bytes() == (masks / "lesion-0.png").read_bytes()  # image 3 takes file 0
    backend = load_backend(str(folder))
    for j, record in enumerate(records):
        mask_png = base64.b64encode((out / record.mask).read_bytes()).decode()
        alone, _ = backend.draw(1, chunk_seed(2, j), {"mask": mask_png})
        assert np.array_equal(np.asarray(Image.open(out / record.image)), alone[0]), record.image

    # the pipeline's shard tasks, with the masks under an s3:// prefix (moto's server) as on a cluster
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="masks")
    for path in sorted(masks.iterdir()):
        s3.upload_file(str(path), "masks", f"set/{path.name}")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "MLFLOW_S3_ENDPOINT_URL": s3_server}
    env.pop("SONOGEN_IMAGE", None)
    run = subprocess.run([sys.executable, "-m", "sonogen.cli", "pipeline", "run", "--pipeline", "generate", "--model",
                          str(folder), "--n", "4", "--seed", "2", "--batch", "3", "--shards", "2", "--out",
                          str(tmp_path / "sharded"), "--condition-folder", "mask=s3://masks/set",
                          "--pipeline-root", str(tmp_path / "kfp")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert dataset(tmp_path / "sharded") == dataset(out)  # the same pairs as one worker from the local folder
    assert all((tmp_path / "sharded" / r.mask).read_bytes() == (out / r.mask).read_bytes() for r in records)
    bad = CliRunner().invoke(app, ["pipeline", "run", "--pipeline", "generate", "--model", str(folder), "--n", "4",
                                   "--out", str(tmp_path / "x"), "--condition-folder", "masks-without-a-key"])
    assert bad.exit_code == 1 and "KEY=FOLDER" in bad.output

    with pytest.raises(ValueError, match="other settings"):  # another folder is another set
        (masks / "lesion-0.png").unlink()
        generate_dataset(str(folder), 4, str(out), seed=2, batch=3, per_image=("mask", masks))
