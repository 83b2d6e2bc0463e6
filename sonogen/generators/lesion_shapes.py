"""The lesion-pairs family's first stage and its regions: lesion shapes learnt from a label's real masks, drawn
into a box, and the parts of a frame the later stages may change.

A shape is a real lesion's mask in its box, kept at ``size``×``size``. Drawing one flips it at random and moves
its outline by a smooth random field added to its signed distance map (``jitter`` × a quarter of the side), so
every draw is a new outline with the label's typical shape, then resizes it into the box the placement chose.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from sonogen.data.manifest import Box

SHAPES, BOXES = "shapes.npy", "boxes.npy"


class ShapeBank:
    """``shapes`` ``(K, S, S)`` uint8 (1 on the lesion) and each one's box ``boxes`` ``(K, 4)`` as fractions of
    its image's width and height."""

    def __init__(self, shapes: np.ndarray, boxes: np.ndarray):
        if len(shapes) == 0 or len(shapes) != len(boxes):
            raise ValueError(f"a shape bank needs one box per shape, at least one; got {len(shapes)} shapes and "
                             f"{len(boxes)} boxes")
        self.shapes, self.boxes = shapes.astype(np.uint8), boxes.astype(np.float32)

    def __len__(self) -> int:
        return len(self.shapes)

    @classmethod
    def from_lesions(cls, lesions: list[tuple[np.ndarray, Box]], size: int = 32) -> ShapeBank:
        """From ``(mask (H, W), box)`` of real lesions; a box whose mask is empty there keeps the ellipse in it."""
        shapes, boxes = [], []
        for mask, (x0, y0, x1, y1) in lesions:
            crop = mask[y0:y1, x0:x1] > 0
            if not crop.any():
                rows, columns = np.mgrid[0:y1 - y0, 0:x1 - x0]
                crop = ((rows + 0.5) / (y1 - y0) - 0.5) ** 2 + ((columns + 0.5) / (x1 - x0) - 0.5) ** 2 <= 0.25
            shapes.append(_resized(crop, size, size))
            height, width = mask.shape
            boxes.append([x0 / width, y0 / height, x1 / width, y1 / height])
        return cls(np.stack(shapes), np.array(boxes))

    def draw(self, index: int, box: Box, shape: tuple[int, int], rng: np.random.Generator,
             jitter: float) -> np.ndarray:
        """Shape ``index`` varied by ``rng`` and drawn into ``box`` of a ``shape`` ``(H, W)`` mask (uint8)."""
        outline = self.shapes[index].astype(bool)
        if rng.random() < 0.5:
            outline = outline[:, ::-1]
        if jitter > 0:
            side = outline.shape[0]
            padded = np.pad(outline, 1)  # the box's edge is an edge of the shape too
            distance = (ndimage.distance_transform_edt(padded) - ndimage.distance_transform_edt(~padded))[1:-1, 1:-1]
            field = ndimage.gaussian_filter(rng.standard_normal(outline.shape), side / 6, mode="wrap")
            moved = distance + jitter * side / 4 * field / (field.std() + 1e-6) > 0
            outline = moved if moved.any() else outline
        x0, y0, x1, y1 = box
        mask = np.zeros(shape, dtype=np.uint8)
        placed = _resized(outline, x1 - x0, y1 - y0)
        if not placed.any():  # a sliver shrunk away: keep the box's centre
            placed[(y1 - y0) // 2, (x1 - x0) // 2] = 1
        mask[y0:y1, x0:x1] = placed
        return mask

    def placed_box(self, index: int, shape: tuple[int, int], rng: np.random.Generator) -> Box:
        """Where a lesion goes on a frame without a found anatomy: shape ``index``'s own box, its size jittered by
        ~10 % and its position by ~5 % of the frame, kept inside the frame."""
        height, width = shape
        fx0, fy0, fx1, fy1 = self.boxes[index]
        w = int(np.clip(round((fx1 - fx0) * width * np.exp(0.1 * rng.standard_normal())), 2, width))
        h = int(np.clip(round((fy1 - fy0) * height * np.exp(0.1 * rng.standard_normal())), 2, height))
        x0 = int(np.clip(round((fx0 + fx1) / 2 * width - w / 2 + 0.05 * width * rng.standard_normal()), 0, width - w))
        y0 = int(np.clip(round((fy0 + fy1) / 2 * height - h / 2 + 0.05 * height * rng.standard_normal()), 0,
                         height - h))
        return [x0, y0, x0 + w, y0 + h]

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / SHAPES, self.shapes)
        np.save(folder / BOXES, self.boxes)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> ShapeBank:
        return cls(np.load(Path(folder) / SHAPES), np.load(Path(folder) / BOXES))


def _resized(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    image = Image.fromarray(mask.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR)
    return (np.asarray(image) >= 0.5).astype(np.uint8)


def near(masks: np.ndarray, margin: int) -> np.ndarray:
    """``masks`` ``(N, H, W)`` grown by ``margin`` pixels: what lesion synthesis may change."""
    grown = masks.astype(bool)
    if margin > 0:
        grown = np.stack([ndimage.binary_dilation(m, np.ones((3, 3), bool), iterations=margin) for m in grown])
    return grown


def behind(masks: np.ndarray, lesion_heights: float) -> np.ndarray:
    """The band under each lesion, ``lesion_heights`` times its height deep in its columns: where a lesion
    shadows or enhances what lies beyond it."""
    band = np.zeros(masks.shape, dtype=bool)
    for k, mask in enumerate(masks):
        rows = np.flatnonzero(mask.any(axis=1))
        if len(rows) == 0 or lesion_heights <= 0:
            continue
        depth = int(np.ceil(lesion_heights * (rows[-1] - rows[0] + 1)))
        columns = mask.any(axis=0)
        band[k, rows[-1] + 1: rows[-1] + 1 + depth, columns] = True
    return band


def feathered(core: np.ndarray, region: np.ndarray, margin: int) -> np.ndarray:
    """Blend weights ``(N, H, W)`` in [0, 1]: 1 on ``core``, fading over ``margin`` pixels, exactly 0 outside
    ``region``, so a blend leaves everything outside it as it was."""
    soft = np.stack([ndimage.gaussian_filter(c.astype(np.float32), max(margin, 1) / 2) for c in core])
    weights = np.clip(2 * soft, 0, 1)
    weights[core.astype(bool)] = 1
    weights[~region] = 0
    return weights.astype(np.float32)
