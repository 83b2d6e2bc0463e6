"""The Lesion-anatomy Bank's anatomy detector on real frames, where no ground truth exists: one frame from each of
``--frames`` random patients of a prepared dataset, with the detected scan fan (green) and pleural line (red)
drawn over it (``anatomy_overlay``, as in a bank's ``anatomy.png``), in a grid to be read by eye; a frame whose
pleural line is not found gets a magenta corner.

    python bench/pleura_on_real.py --data DATASET --out GRID.png [--frames 32] [--seed 0]

Prints one line per frame: its label and image.
"""

from __future__ import annotations

import argparse
import random

import numpy as np
from PIL import Image

from sonogen.data import UltrasoundDataset
from sonogen.data.lesion_bank import anatomy_overlay
from sonogen.generators import to_uint8
from sonogen.sampling import tile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dataset = UltrasoundDataset(args.data)
    by_patient: dict[str, list[int]] = {}
    for k, record in enumerate(dataset.records):
        by_patient.setdefault(record.patient_id, []).append(k)
    pick = random.Random(args.seed)
    chosen = [pick.choice(by_patient[p]) for p in pick.sample(sorted(by_patient), min(args.frames, len(by_patient)))]
    for n, k in enumerate(chosen):
        print(f"{n}: {dataset.records[k].label} {dataset.records[k].image}")
    overlays = np.stack([anatomy_overlay(to_uint8(dataset[k]["image"][None])[0]) for k in chosen])
    Image.fromarray(tile(overlays, border=4)).save(args.out)
    print(f"grid: {args.out}")


if __name__ == "__main__":
    main()
