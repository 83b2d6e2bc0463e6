"""Do the realism metrics tell real from not-real? Real training frames against real test patients (the
baseline a perfect generator reaches) and against the phantom, in pixel and us-encoder feature spaces.

    python bench/gates_real_data.py PREPARED_REAL PREPARED_PHANTOM WORKDIR

Both datasets must be prepared at the same size. The us-encoder is trained on the real training split and
registered in a private MLflow store under WORKDIR.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch


def main(real: str, phantom: str, workdir: str, samples: int = 500) -> None:
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"
    from sonogen.evaluation import split_images, train_encoder
    from sonogen.gates import realism
    from sonogen.metrics.features import get_extractor

    def subset(images: torch.Tensor) -> torch.Tensor:
        return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:samples]]

    start = time.perf_counter()
    encoder = train_encoder(real, Path(workdir) / "us-encoder", "bench")
    print(f"us-encoder trained in {time.perf_counter() - start:.0f} s, validation accuracy "
          f"{encoder['val_accuracy']:.3f}")
    train, _, _ = split_images(real, "train")
    test, _, _ = split_images(real, "test")
    phantom_images = torch.cat([split_images(phantom, split)[0] for split in ("train", "val", "test")])
    train, test, phantom_images = subset(train), subset(test), subset(phantom_images)
    print(f"real train {len(train)}, real test {len(test)}, phantom {len(phantom_images)} images")
    print("| extractor | comparison | kMMD | 1-NN acc | FID |")
    print("|---|---|---|---|---|")
    for spec in ("pixels-16", f"us-encoder:{encoder['folder']}"):
        extractor = get_extractor(spec)
        for name, other in (("real train vs real test", test), ("real train vs phantom", phantom_images)):
            m = realism(train, other, extractor)
            print(f"| {extractor.id} | {name} | {m['kmmd']:.4f} | {m['one_nn_acc']:.3f} | {m['fid']:.3g} |")


if __name__ == "__main__":
    main(*sys.argv[1:4])
