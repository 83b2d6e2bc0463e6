"""Sampling throughput of the 256 px paper DCGAN generator: torch eager fp32 (the baseline), ONNX Runtime fp32,
and torch bf16 (channels_last, oneDNN), each as a fraction of this machine's GEMM rate in the same precision,
measured in the same run; plus how far bf16 samples are from fp32 ones.

    python bench/sampler_speed.py [--device cpu|cuda] [--repeats 3] [--generator FOLDER]

Speed does not depend on the weights, so by default the generator has random ones (N(0, 0.02) as at
initialisation). Those make nearly flat images, so compare bf16 with fp32 on a trained 256 px generator: give
the folder `sonogen train dcgan --out FOLDER` wrote as ``--generator``.

On CUDA the ONNX Runtime row uses its CUDA execution provider and is left out where the installed onnxruntime has
none (the CPU build); a fourth row replays the bf16 network as a CUDA graph (``torch.compile``, mode
``reduce-overhead``), which removes the per-kernel launch cost that dominates small batches on a GPU.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from dcgan_throughput import gemm_rate

from sonogen.export import export_to_onnx
from sonogen.generators.base import load_generator
from sonogen.generators.dcgan import DCGAN, DCGANConfig, generator_flops
from sonogen.metrics import kernel_mmd
from sonogen.sampling import gaussian_latents, to_uint8


def images_per_second(run, latents: np.ndarray, repeats: int, device: torch.device) -> float:
    run(latents)  # warm-up: kernel selection, allocations
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(latents)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return len(latents) / best


def pixel_features(images: np.ndarray) -> torch.Tensor:
    pooled = torch.nn.functional.avg_pool2d(torch.from_numpy(images).float()[:, None] / 255, 8)
    return pooled.flatten(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--generator", type=Path, help="a saved 256 px DCGAN (default: random weights)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.generator:
        generator = load_generator(args.generator)
        config = generator.config
        if generator.family != "dcgan" or config.image_size != 256:
            raise ValueError(f"{args.generator} is not a 256 px DCGAN")
    else:
        config = DCGANConfig(label="x", image_size=256)
        generator = DCGAN(config)
    # the whole generator, not only its network: the ONNX export returns the network to the generator's device
    network = generator.to(device).generator.eval()
    flops = generator_flops(config)

    import onnxruntime

    onnx_path = Path(tempfile.mkdtemp()) / "dcgan256.onnx"
    parity = export_to_onnx(generator, onnx_path)["max_abs_diff"]
    provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    # onnxruntime falls back to the CPU, with a warning only, when a provider is missing: that row would be no GPU row
    session = (onnxruntime.InferenceSession(str(onnx_path), providers=[provider])
               if provider in onnxruntime.get_available_providers() else None)
    bf16 = DCGAN(config).generator.eval()
    bf16.load_state_dict(network.state_dict())
    bf16 = bf16.to(device=device, dtype=torch.bfloat16, memory_format=torch.channels_last)

    @torch.no_grad()
    def torch_fp32(latents):
        return network(torch.from_numpy(latents).to(device)).float().cpu().numpy()

    @torch.no_grad()
    def torch_bf16(latents):
        return bf16(torch.from_numpy(latents).to(device, torch.bfloat16)).float().cpu().numpy()

    def onnx_fp32(latents):
        return session.run(["images"], {"latents": latents})[0]

    paths = {"torch eager fp32": (torch_fp32, "fp32")}
    if session is not None:
        paths["ONNX Runtime fp32"] = (onnx_fp32, "fp32")
    paths["torch bf16 channels_last"] = (torch_bf16, "bf16")
    if device.type == "cuda":
        graphed = torch.compile(bf16, mode="reduce-overhead")

        @torch.no_grad()
        def torch_bf16_graph(latents):
            return graphed(torch.from_numpy(latents).to(device, torch.bfloat16)).float().cpu().numpy()

        paths["torch bf16 CUDA graph"] = (torch_bf16_graph, "bf16")

    gemm_size = 8192 if device.type == "cuda" else 2048
    gemm = {precision: gemm_rate(device, dtype, gemm_size, 10)
            for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, device "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}"
          f"{f', cuDNN TF32 {torch.backends.cudnn.allow_tf32}' if device.type == 'cuda' else ''}")
    if session is None:
        print(f"onnxruntime has no {provider} here ({', '.join(onnxruntime.get_available_providers())}): "
              "no ONNX Runtime row")
    print(f"GEMM {gemm_size}²: fp32 {gemm['fp32'] / 1e9:.1f} GFLOP/s, bf16 {gemm['bf16'] / 1e9:.1f} GFLOP/s; "
          f"generator {flops / 1e9:.2f} GFLOP per image; ONNX export parity {parity:.2g}")
    print("| path | batch | images/s | × torch eager | GFLOP/s | fraction of GEMM (same precision) |")
    print("|---|---|---|---|---|---|")
    for batch in (1, 16):
        latents = gaussian_latents(0, batch, config.latent_dim)
        rates = {name: images_per_second(run, latents, args.repeats * (4 if batch == 1 else 1), device)
                 for name, (run, _) in paths.items()}
        for name, (_, precision) in paths.items():
            achieved = rates[name] * flops
            print(f"| {name} | {batch} | {rates[name]:.2f} | {rates[name] / rates['torch eager fp32']:.2f} | "
                  f"{achieved / 1e9:.1f} | {achieved / gemm[precision]:.3f} |")

    latents = gaussian_latents(1, 64, config.latent_dim)
    exact, reduced = to_uint8(torch_fp32(latents)), to_uint8(torch_bf16(latents))
    other_draw = to_uint8(torch_fp32(gaussian_latents(2, 64, config.latent_dim)))
    print(f"bf16 vs fp32 on 64 images: max pixel difference {np.abs(exact.astype(int) - reduced).max()} grey levels, "
          f"mean {np.abs(exact.astype(int) - reduced).mean():.3f}; kMMD(fp32, bf16) "
          f"{kernel_mmd(pixel_features(exact), pixel_features(reduced))['biased']:.2e} vs kMMD between two fp32 "
          f"draws {kernel_mmd(pixel_features(exact), pixel_features(other_draw))['biased']:.2e} (biased form: paired sets)")


if __name__ == "__main__":
    main()
