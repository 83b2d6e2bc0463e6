"""The held-out reading of a latent diffusion model while it trains: its denoising loss on the ``val`` split, and,
for a ControlNet, how much of the loss inside held-out lesions their own condition removes against another
patient's (about 0 for a ControlNet that does not read its condition)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

HELD_OUT_TIMESTEPS = 10  # spread evenly over the schedule, so the held-out loss reads like the training loss


def of_other_patients(patients: list[str]) -> list[int] | None:
    """For each image, the next one (cyclically) of another patient; None when they are all one patient's."""
    count = len(patients)
    partners = [next((j % count for j in range(k + 1, k + count) if patients[j % count] != patient), None)
                for k, patient in enumerate(patients)]
    return None if None in partners else partners


@torch.no_grad()
def held_out_losses(model, images: torch.Tensor, items: Sequence[dict]) -> dict[str, float]:
    """``val_loss``: the denoising loss at timesteps spread over the schedule, with fixed noise, under the
    averaged weights that sampling uses. A ControlNet is also read inside the held-out lesions, given each
    image's own condition and given another patient's: ``val_mask_loss_gain`` is the share of the lesion loss
    that the right condition removes (about 0 for a ControlNet that does not read its condition)."""
    c = model.config
    if model.mode.trains_autoencoder and model.step < c.vae_steps:
        return {}
    maps = model.mode.control_maps(c, images, items)
    maps = None if maps is None else maps.to(model.device)
    with model._averaged_weights():
        latents = model.vae.encode(model.nets.vae_input(images)).latent_dist.mode()
        latents = latents * model.vae.config.scaling_factor
        states = model._embed(torch.tensor([c.labels.index(item["label"]) + 1 for item in items]))
        errors = denoising_errors(model, latents, states, maps)
        losses = {"val_loss": errors.mean().item()}
        if maps is None:
            return losses
        lesion = F.adaptive_max_pool2d((maps > 0).float(), latents.shape[-2:])
        if not lesion.any():
            return losses

        def inside(errors_per_pixel: torch.Tensor) -> float:
            return ((errors_per_pixel * lesion).sum() / lesion.sum()).item()

        losses["val_lesion_loss"] = inside(errors)
        shown = torch.nonzero(lesion.flatten(1).sum(1) > 0).flatten().tolist()
        partners = of_other_patients([items[k]["patient_id"] for k in shown])
        if partners is None:  # one patient's lesions sit in one place: no other condition to compare with
            return losses
        others = maps.clone()
        others[shown] = maps[[shown[j] for j in partners]]
        other = inside(denoising_errors(model, latents, states, others))
    return {**losses, "val_lesion_loss_other_mask": other,
            "val_mask_loss_gain": 1 - losses["val_lesion_loss"] / other}


def denoising_errors(model, latents: torch.Tensor, states: torch.Tensor, maps: torch.Tensor | None) -> torch.Tensor:
    """Squared error per latent pixel ``(N, 1, h, w)``, averaged over ``HELD_OUT_TIMESTEPS`` timesteps and
    channels; the same noise on every call, so two conditions are compared on equal terms."""
    generator = torch.Generator().manual_seed(0)
    total = model.noise_scheduler.config.num_train_timesteps
    errors = torch.zeros(len(latents), 1, *latents.shape[-2:], device=latents.device)
    for fraction in (np.arange(HELD_OUT_TIMESTEPS) + 0.5) / HELD_OUT_TIMESTEPS:
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        timesteps = torch.full((len(latents),), int(fraction * total), device=latents.device)
        noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = model._predict(noisy, timesteps, states, maps)
        errors += (prediction - model._target(latents, noise, timesteps)).square().mean(dim=1, keepdim=True)
    return errors / HELD_OUT_TIMESTEPS
