"""Data-parallel training: R ranks with batch b take the step one process takes with batch R·b, torchrun runs
`sonogen train` end to end, and a rank that dies fails the job quickly and `--resume` finishes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

import ddp_steps
from sonogen.generators import distributed, load_generator
from sonogen.generators.dcgan import DCGAN, DCGANConfig
from sonogen.jobs.launch import run_on_local_ranks, torchrun_command, without_option

ROOT = Path(__file__).resolve().parent.parent


def torchrun(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def ranks_weights(out: Path) -> tuple[dict, dict]:
    return load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))


def per_half_dcgan_step() -> dict[str, torch.Tensor]:
    """The DCGAN step of ``ddp_steps.dcgan_step`` in one process, each half of the batch normalised apart (as
    each CPU rank's BatchNorm sees its own half) and the halves' losses averaged (as DDP averages gradients)."""
    torch.manual_seed(0)
    model = DCGAN(DCGANConfig(label="x", image_size=16, base_channels=4, dropout=0.0, lr_generator=1e-3,
                              lr_discriminator=1e-3))
    images = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    torch.manual_seed(1)
    latents = torch.randn(8, 100)  # the global batch's draw
    halves = [slice(0, 4), slice(4, 8)]
    fakes = [model.generator(latents[half]) for half in halves]
    optimizers = model.optimizers()
    optimizers["discriminator"].zero_grad()
    loss_d = sum(F.binary_cross_entropy_with_logits(model.discriminator(images[half]), torch.ones(4))
                 + F.binary_cross_entropy_with_logits(model.discriminator(fake.detach()), torch.zeros(4))
                 for half, fake in zip(halves, fakes)) / 2
    loss_d.backward()
    optimizers["discriminator"].step()
    optimizers["generator"].zero_grad()
    loss_g = sum(F.binary_cross_entropy_with_logits(model.discriminator(fake), torch.ones(4)) for fake in fakes) / 2
    loss_g.backward()
    optimizers["generator"].step()
    return model._weights()


def test_a_gan_step_on_two_cpu_ranks_averages_the_gradients_of_their_halves(tmp_path):
    torchrun([str(ROOT / "tests" / "ddp_steps.py"), "dcgan", "unused", str(tmp_path)], tmp_path)
    rank0, rank1 = ranks_weights(tmp_path)
    reference = per_half_dcgan_step()
    torch.manual_seed(0)
    initial = DCGAN(DCGANConfig(label="x", image_size=16, base_channels=4, dropout=0.0))._weights()
    parameters = [key for key in reference if key.endswith("weight") or key.endswith("bias")]
    assert parameters and all(not torch.equal(initial[key], rank0[key]) for key in parameters)  # it learnt
    for key in parameters:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)  # the ranks stay identical
        torch.testing.assert_close(rank0[key], reference[key], rtol=1e-5, atol=1e-6)


def assert_same_step(ranks: dict, single: dict, initial: dict, tolerance: float, lr: float) -> None:
    """Every tensor as one process has it, to ``tolerance``; except a bias whose gradient is zero but for rounding
    (before a GroupNorm). Adam's first step moves a weight by ``lr`` times its gradient over the gradient's size
    plus epsilon (1e-8): a full ``lr`` for a real gradient, a small part of it for one that is rounding, and
    rounding differs between one batch of 8 and two of 4. Such a bias moved by under half of ``lr`` in both."""
    for key, value in single.items():
        if torch.allclose(ranks[key], value, rtol=0, atol=tolerance):
            continue
        assert key.endswith(".bias"), f"{key}: {(ranks[key] - value).abs().max():.3g} from one process"
        moved = max((ranks[key] - initial[key]).abs().max(), (value - initial[key]).abs().max())
        assert moved < 0.5 * lr, f"{key} moved {moved:.3g}, differently in one process"


@pytest.mark.parametrize("family", ["sinddm", "ldm"])
def test_a_diffusion_run_on_two_cpu_ranks_equals_one_process_with_the_global_batch(lus, tmp_path, family):
    torchrun([str(ROOT / "tests" / "ddp_steps.py"), family, str(lus), str(tmp_path / "ranks")], tmp_path)
    rank0, rank1 = ranks_weights(tmp_path / "ranks")
    single = ddp_steps.RUNS[family](lus, tmp_path / "single")
    assert rank0.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
    if family == "sinddm":
        for key, value in single.items():
            torch.testing.assert_close(rank0[key], value, rtol=0, atol=1e-6)
    else:
        initial = ddp_steps.ldm_model()._weights()
        assert_same_step(rank0, single, initial, tolerance=1e-5, lr=1e-3)  # the autoencoder's
        assert sum(not torch.equal(initial[key], rank0[key]) for key in initial) > 0.9 * len(initial)  # it learnt
    # only rank 0 wrote: one history, with the losses of the global batch
    history = json.loads((tmp_path / "ranks" / "run" / "history.json").read_text())
    assert [record["step"] for record in history] == [3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SyncBatchNorm runs on CUDA only: needs a GPU")
def test_with_sync_batchnorm_a_gan_step_on_two_gpu_ranks_equals_one_gpu_with_the_global_batch(tmp_path):
    """Two ranks (on one GPU each, or both on one GPU over gloo) with batch 4 take the step of one process with 8:
    BatchNorm's statistics are the global batch's."""
    torchrun([str(ROOT / "tests" / "ddp_steps.py"), "dcgan-sync", "unused", str(tmp_path)], tmp_path)
    rank0, rank1 = ranks_weights(tmp_path)
    single = {key: value.cpu() for key, value in ddp_steps.dcgan_step(None, None, torch.device("cuda", 0)).items()}
    torch.manual_seed(0)
    initial = DCGAN(DCGANConfig(label="x", image_size=16, base_channels=4, dropout=0.0))._weights()
    parameters = {key: single[key] for key in single if key.endswith("weight") or key.endswith("bias")}
    assert all(not torch.equal(initial[key], rank0[key]) for key in parameters)  # it learnt
    for key in parameters:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
    assert_same_step({key: rank0[key] for key in parameters}, parameters, initial, tolerance=1e-5, lr=1e-3)
    # without synchronised statistics the step is another: each half normalised apart
    apart = per_half_dcgan_step()
    assert any(not torch.allclose(apart[key], single[key], atol=1e-4) for key in parameters)


def test_sync_batchnorm_on_cpu_ranks_and_an_uneven_batch_say_what_to_change():
    with pytest.raises(ValueError, match="sync_batchnorm needs GPU ranks.*set it to false"):
        distributed.sync_batchnorm(DCGAN(DCGANConfig(label="x", image_size=16, base_channels=4)).generator,
                                   torch.device("cpu"))
    with pytest.raises(ValueError, match="global batch of 6 does not split over 4 ranks.*multiple of 4"):
        distributed.share(torch.zeros(6, 2), 0, 4)


def test_the_launcher_is_torchrun_on_loopback_with_the_same_command(monkeypatch):
    argv = ["train", "dcgan", "--data", "d", "--nproc-per-node", "2", "--label", "x", "--nproc-per-node=2"]
    assert without_option(argv, "--nproc-per-node") == ["train", "dcgan", "--data", "d", "--label", "x"]
    command = torchrun_command(2, argv)
    assert command[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc-per-node=2" in command
    assert command[-7:] == ["--", "train", "dcgan", "--data", "d", "--label", "x"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="already one of torchrun's ranks"):
        run_on_local_ranks(2, argv)


def _train(data: Path, out: Path, config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sonogen.cli", "train", "dcgan", "--data", str(data), "--label",
                             "consolidation", "--config", str(config), "--out", str(out), "--no-register",
                             "--monitor", "pixels-16", "--nproc-per-node", "2", *extra],
                            cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _ranks_of(process: subprocess.Popen) -> dict:
    import psutil

    ranks = {}
    for child in psutil.Process(process.pid).children(recursive=True):
        try:
            environment = child.environ()
        except psutil.Error:
            continue
        if "LOCAL_RANK" in environment:
            ranks[int(environment["RANK"])] = child
    return ranks


def test_two_ranks_train_end_to_end_a_killed_rank_fails_the_job_and_resume_finishes_it(lus, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": {"image_size": 32, "base_channels": 4}, "train": {
        "epochs": 12, "batch_size": 4, "eval_samples": 4, "monitor_samples": 8, "eval_every": 6}}))
    out = tmp_path / "trained"
    process = _train(lus, out, config)
    deadline = time.monotonic() + 180
    while not (out / "checkpoint.safetensors").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    ranks = _ranks_of(process)
    assert sorted(ranks) == [0, 1], process.communicate()[0][-3000:]
    killed = time.monotonic()
    os.kill(ranks[1].pid, signal.SIGKILL)
    output = process.communicate(timeout=60)[0]
    assert process.returncode != 0 and time.monotonic() - killed < 30
    assert "torchrun failed" in output and "--resume continues" in output
    checkpoint_epoch = json.loads((out / "history.json").read_text())[-1]["epoch"]
    assert checkpoint_epoch < 12

    resumed = _train(lus, out, config, "--resume")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output[-3000:]
    history = json.loads((out / "history.json").read_text())
    assert [record["epoch"] for record in history] == list(range(1, 13))
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])  # its own store, whatever other tests set
    [run] = client.search_runs([client.get_experiment_by_name(f"{lus.name}-dcgan").experiment_id])
    assert run.data.params["train.ranks"] == "2" and run.data.params["train.per_rank_batch"] == "2"
    assert run.data.params["train.batch_size"] == "4"
    model = load_generator(out / "generator")
    first = model.sample(3, seed=7)
    assert first.shape == (3, 1, 32, 32) and torch.equal(first, load_generator(out / "generator").sample(3, seed=7))
