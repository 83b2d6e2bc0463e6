"""Training speed of the reduced-VGG classifier that the downstream gate retrains nine times, at the size of a
POCUS evaluation (223 px, batch 32): the product's ``train_classifier`` (channels-last on the CPU) against the
same steps written out in NCHW fp32 (the baseline of this run), channels-last fp32, and bf16 autocast in both
layouts.

    python bench/classifier_speed.py [--size 223] [--images 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from sonogen.metrics.classifier import ClassifierConfig, ReducedVGG, train_classifier


def variant_seconds(images: torch.Tensor, targets: torch.Tensor, device: torch.device, channels_last: bool,
                    bf16: bool, batch_size: int) -> float:
    """Seconds for one pass over ``images``, after one warm-up batch."""
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = ReducedVGG(ClassifierConfig(classes=["negative", "positive"])).to(device, memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(start: int) -> None:
        x = images[start : start + batch_size].to(device).contiguous(memory_format=layout)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), targets[start : start + batch_size].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for offset in range(0, len(images), batch_size):
        step(offset)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=223)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.images, 1, args.size, args.size, generator=generator) * 2 - 1
    targets = torch.randint(0, 2, (args.images,), generator=generator)
    print(f"device {device}, threads {torch.get_num_threads()}, {args.images} images of {args.size} px, "
          f"batch {args.batch_size}; seconds per pass (ratio to the baseline, lower is faster)")
    baseline = variant_seconds(images, targets, device, False, False, args.batch_size)
    print(f"  NCHW fp32 (baseline)       {baseline:7.2f} s  1.00")
    for name, channels_last, bf16 in [("channels-last fp32", True, False), ("NCHW bf16 autocast", False, True),
                                      ("channels-last bf16", True, True)]:
        seconds = variant_seconds(images, targets, device, channels_last, bf16, args.batch_size)
        print(f"  {name:<26} {seconds:7.2f} s  {seconds / baseline:.2f}")
    config = ClassifierConfig(classes=["negative", "positive"], epochs=1, batch_size=args.batch_size)
    start = time.perf_counter()
    train_classifier(images, targets, config, device)
    seconds = time.perf_counter() - start
    print(f"  train_classifier, 1 epoch  {seconds:7.2f} s  {seconds / baseline:.2f} (flips and class weights too)")


if __name__ == "__main__":
    main()
