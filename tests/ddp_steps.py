"""Tiny training runs that test_distributed.py takes once in one process and once with torchrun on 2 CPU ranks:
``python -m torch.distributed.run --nproc-per-node 2 tests/ddp_steps.py FAMILY DATA OUT`` writes each rank's
weights after the run to ``OUT/rank<k>.safetensors``. ``dcgan-sync`` runs its ranks on GPUs: one each where there
are enough, else all on the first over gloo (NCCL refuses two ranks on one GPU; SyncBatchNorm gathers over either)."""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
from safetensors.torch import save_file

from sonogen.data import UltrasoundDataset
from sonogen.generators import distributed
from sonogen.generators.dcgan import DCGAN, DCGANConfig
from sonogen.generators.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from sonogen.generators.sinddm import MultiScaleDDMConfig, SinDDM
from sonogen.generators.trainer import TrainConfig, train

GLOBAL_BATCH = 8


def dcgan_step(data: Path | None, out: Path | None, device: torch.device = torch.device("cpu"),
               sync_batchnorm: bool = False) -> dict[str, torch.Tensor]:
    """One DCGAN step on a fixed global batch of 8 (no dropout: its masks are drawn per call). On a GPU, without
    TF32: its rounding would hide a wrong step behind the tolerance."""
    ranks = distributed.current()
    device = distributed.device_of(ranks, device) if torch.cuda.device_count() >= ranks.world else device
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = DCGAN(DCGANConfig(label="x", image_size=16, base_channels=4, dropout=0.0, lr_generator=1e-3,
                              lr_discriminator=1e-3)).to(device)
    if ranks.distributed:
        if sync_batchnorm:
            for module in model.networks().values():
                distributed.sync_batchnorm(module, device)
        model.distribute(distributed.ddp_wrapper(device), ranks.rank, ranks.world)
    images = torch.rand(GLOBAL_BATCH, 1, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    torch.manual_seed(1)
    model.train_step(model.share_batch(images.to(device), GLOBAL_BATCH))
    return model._weights()


def _trained(model, data: Path, out: Path, label: str, steps: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    train(model, data, label, TrainConfig(epochs=1, batch_size=GLOBAL_BATCH, steps_per_epoch=steps, eval_samples=2,
                                          precision="fp32", device="cpu"), out)
    return model._weights()


def sinddm_run(data: Path, out: Path) -> dict[str, torch.Tensor]:
    first = UltrasoundDataset(data, split="train", labels=["consolidation"]).records[0].image
    torch.manual_seed(0)
    model = SinDDM(MultiScaleDDMConfig(label="consolidation", images=(first,), coarsest_area=100,
                                       coarsest_side=(8, 12), timesteps=20, channels=16))
    return _trained(model, data, out, "consolidation", steps=3)


def ldm_model() -> LatentDiffusion:
    torch.manual_seed(0)
    return LatentDiffusion(LatentDiffusionConfig(label="consolidation", image_size=32, vae_channels=(8, 16),
                                                 unet_channels=(16, 32), embedding_dim=16, vae_steps=1, steps=2,
                                                 train_timesteps=40))


def ldm_run(data: Path, out: Path) -> dict[str, torch.Tensor]:
    """A from-scratch model: one autoencoder step, then two latent UNet steps (with EMA)."""
    return _trained(ldm_model(), data, out, "consolidation", steps=3)


RUNS = {"dcgan": dcgan_step, "sinddm": sinddm_run, "ldm": ldm_run,
        "dcgan-sync": lambda data, out: dcgan_step(data, out, torch.device("cuda", 0), sync_batchnorm=True)}


if __name__ == "__main__":
    family, data, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if family == "dcgan-sync" and torch.cuda.device_count() < int(os.environ["WORLD_SIZE"]):
        torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=120))
    ranks = distributed.start(timeout_s=120)
    out.mkdir(parents=True, exist_ok=True)
    weights = RUNS[family](data, out / "run")
    save_file(weights, str(out / f"rank{ranks.rank}.safetensors"))
    distributed.stop()
