"""Weights from outside (a base Stable Diffusion, a metric backbone) are read from safetensors only: unpickling a
file runs whatever code it names. ``sonogen convert-weights`` turns a pickle checkpoint into safetensors, once,
on a machine and with a file the user trusts."""

from __future__ import annotations

from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# the names diffusers and transformers look for once a pickle file is converted
SAFETENSORS_NAMES = {"diffusion_pytorch_model.bin": "diffusion_pytorch_model.safetensors",
                     "pytorch_model.bin": "model.safetensors"}


def pickle_refused(path: Path, what: str) -> ValueError:
    return ValueError(f"{path} holds pickle weights ({what}); sonogen reads safetensors only, since unpickling can "
                      f"run code: convert it once with `sonogen convert-weights {path}`")


def check_safetensors_folder(folder: Path, what: str) -> None:
    """Refuses a diffusers/transformers model folder whose weights exist only as pickle files."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise pickle_refused(pickled[0], what)


def converted_name(path: Path) -> Path:
    return path.with_name(SAFETENSORS_NAMES.get(path.name, path.stem + ".safetensors"))


def convert_to_safetensors(path: str | Path) -> list[Path]:
    """Writes a ``.safetensors`` beside every pickle weight file at ``path`` (a file, or a model folder walked
    recursively); returns the files written. Only flat tensor state dicts are accepted, read with torch's
    restricted unpickler."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    sources = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if not sources:
        raise FileNotFoundError(f"{path}: no pickle weight file ({', '.join(PICKLE_SUFFIXES)}) to convert")
    written = []
    for source in sources:
        state = torch.load(source, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # Lightning-style checkpoints
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{source} is not a flat state_dict of tensors; convert it with the tool that wrote it")
        target = converted_name(source)
        # shared storage (tied weights) cannot be saved as is
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(target))
        written.append(target)
    return written
