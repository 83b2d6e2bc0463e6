"""Sampling throughput of the 256 px paper DCGAN generator: torch eager fp32 (the baseline), ONNX Runtime fp32
and int8 (`sonogen export onnx --precision int8`), and torch bf16 (channels_last, oneDNN), each as a fraction of
this machine's GEMM rate in the same precision, measured in the same run (int8: ONNX Runtime's own integer GEMM);
plus how far bf16 and int8 samples are from fp32 ones.

    python bench/sampler_speed.py [--device cpu|cuda] [--repeats 3] [--generator FOLDER]

Speed does not depend on the weights, so by default the generator has random ones (N(0, 0.02) as at
initialisation). Those make nearly flat images, so compare bf16 with fp32 on a trained 256 px generator: give
the folder `sonogen train dcgan --out FOLDER` wrote as ``--generator``.

On CUDA the ONNX Runtime fp32 row uses its CUDA execution provider and is left out where the installed onnxruntime
has none (the CPU build), and there is no int8 row (its quantised convolutions are CPU kernels); another row
replays the bf16 network as a CUDA graph (``torch.compile``, mode ``reduce-overhead``), which removes the
per-kernel launch cost that dominates small batches on a GPU.
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
from sonogen.generators import load_generator
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


def onnx_int8_gemm_rate(size: int, repeats: int, path: Path) -> float:
    """ONNX Runtime's uint8 × int8 → int32 matrix product (``MatMulInteger``), the kernel under its quantised
    convolutions, in operations per second."""
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(0).integers(-128, 128, (size, size), dtype=np.int8)
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "gemm",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [size, size])],
                              [helper.make_tensor_value_info("c", TensorProto.INT32, [size, size])],
                              [numpy_helper.from_array(weights, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    a = np.random.default_rng(1).integers(0, 256, (size, size), dtype=np.uint8)
    for _ in range(2):
        session.run(None, {"a": a})
    start = time.perf_counter()
    for _ in range(repeats):
        session.run(None, {"a": a})
    return 2 * size**3 * repeats / (time.perf_counter() - start)


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

    workdir = Path(tempfile.mkdtemp())
    parity = export_to_onnx(generator, workdir / "dcgan256.onnx")["max_abs_diff"]
    provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    # onnxruntime falls back to the CPU, with a warning only, when a provider is missing: that row would be no GPU row
    session = (onnxruntime.InferenceSession(str(workdir / "dcgan256.onnx"), providers=[provider])
               if provider in onnxruntime.get_available_providers() else None)
    if device.type == "cpu":
        int8 = export_to_onnx(generator, workdir / "dcgan256-int8.onnx", "int8")
        int8_session = onnxruntime.InferenceSession(str(workdir / "dcgan256-int8.onnx"), providers=[provider])
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

    def onnx_int8(latents):
        return int8_session.run(["images"], {"latents": latents})[0]

    paths = {"torch eager fp32": (torch_fp32, "fp32")}
    if session is not None:
        paths["ONNX Runtime fp32"] = (onnx_fp32, "fp32")
    if device.type == "cpu":
        paths["ONNX Runtime int8"] = (onnx_int8, "int8")
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
    if device.type == "cpu":
        gemm["int8"] = onnx_int8_gemm_rate(gemm_size, 10, workdir / "gemm-int8.onnx")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, device "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}"
          f"{f', cuDNN TF32 {torch.backends.cudnn.allow_tf32}' if device.type == 'cuda' else ''}")
    if session is None:
        print(f"onnxruntime has no {provider} here ({', '.join(onnxruntime.get_available_providers())}): "
              "no ONNX Runtime row")
    print(f"GEMM {gemm_size}²: " + ", ".join(f"{p} {rate / 1e9:.1f} GFLOP/s" for p, rate in gemm.items())
          + f"; generator {flops / 1e9:.2f} GFLOP per image; ONNX export parity {parity:.2g}")
    if device.type == "cpu":
        print(f"int8 export: {int8['bytes'] / 1e6:.0f} MB; its samples' kernel MMD to fp32's "
              f"{int8['mmd_ratio']:.3g} of two fp32 draws', max pixel difference {int8['max_grey_diff']} grey levels "
              f"(mean {int8['mean_grey_diff']:.3f}); its convolutions do 2.25x the generator's multiply-adds, "
              "counted here as the generator's")
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
    exact = to_uint8(torch_fp32(latents))
    between_draws = kernel_mmd(pixel_features(exact), pixel_features(to_uint8(torch_fp32(
        gaussian_latents(2, 64, config.latent_dim)))))["biased"]
    for precision, run in [("bf16", torch_bf16)] + ([("int8", onnx_int8)] if device.type == "cpu" else []):
        reduced = to_uint8(run(latents))
        difference = np.abs(exact.astype(int) - reduced)
        print(f"{precision} vs fp32 on 64 images: max pixel difference {difference.max()} grey levels, mean "
              f"{difference.mean():.3f}; kMMD(fp32, {precision}) "
              f"{kernel_mmd(pixel_features(exact), pixel_features(reduced))['biased']:.2e} vs kMMD between two fp32 "
              f"draws {between_draws:.2e} (biased form: paired sets)")


if __name__ == "__main__":
    main()
