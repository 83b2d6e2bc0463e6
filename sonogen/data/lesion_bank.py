"""The Lesion-anatomy Bank of DiffUltra (arXiv 2501.06356), built from bounding boxes only.

Per image, the *anatomy*: the scan fan and the pleural line (one row per column), with the image's anchor
``(X, Y)``: the fan's centre column on the pleura. Per lesion box: its *structure map* (the lesion's hyper-/
hypo-echoic pattern, band-passed and normalised, at a fixed size), its size, and its offset from the anatomy:
``lateral`` (box centre from the anchor, in half-widths of the detected pleural line) and ``depth`` (box top
below the pleura, in image heights). Sampling for a target anatomy draws a lesion from the kernel-conditional
``P(lateral, depth, size | X, Y)`` and places it there, below the pleura and inside the fan. The choices and
their reasons are in ``docs/diffultra.md``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from sonogen.data.manifest import Box, load_grey, read_manifest
from sonogen.data.prepare import scan_region

LESIONS = "lesions.json"
STRUCTURES = "structures.npy"
ANATOMY_REVIEW = "anatomy.png"  # the lesion images with what the bank read on them, for a person to check
FAN_COLOUR, PLEURA_COLOUR, BOX_COLOUR, NOT_FOUND_COLOUR = (0, 255, 0), (255, 0, 0), (255, 255, 0), (255, 0, 255)
SIZE_BIASES = ("none", "large")
CONDITIONS = ("structure", "binary")
LARGE_QUANTILE = 0.9  # lesions with a box area in the top 10% are "large" (the paper's rare large consolidations)
PLACEMENT_TRIES = 64
PLEURA_STRENGTH = 0.8  # a chest-wall line this close to the strongest one in its column may hide the pleura
MIN_RIDGE = 1e-3  # of the fan's mean brightness: flatter than this is rounding, not a line (a uniform frame)


@dataclass(frozen=True)
class Anatomy:
    fan: np.ndarray  # bool (H, W)
    pleura: np.ndarray  # (W,) row of the pleural line per column, NaN where the fan has none

    @property
    def columns(self) -> np.ndarray:
        return np.flatnonzero(np.isfinite(self.pleura))

    @property
    def centre(self) -> float:
        return float(self.columns[[0, -1]].mean())

    @property
    def half_width(self) -> float:
        return max(1.0, float(self.columns[-1] - self.columns[0]) / 2)

    def pleura_at(self, x: float) -> float:
        columns = self.columns
        return float(np.interp(x, columns, self.pleura[columns]))

    def pleura_top(self, x0: int, x1: int) -> float:
        """The highest pleura row over columns ``x0 … x1 - 1``, where a box from the pleura down starts."""
        rows = self.pleura[max(0, x0): max(x0 + 1, x1)]
        return float(np.nanmin(rows)) if np.isfinite(rows).any() else self.pleura_at((x0 + x1) / 2)

    @property
    def anchor(self) -> tuple[float, float]:
        """``(X, Y)`` as fractions of the image width and height."""
        height, width = self.fan.shape
        return self.centre / width, self.pleura_at(self.centre) / height


def detect_pleura(image: np.ndarray, fan: np.ndarray) -> np.ndarray:
    """The pleural line of a uint8 frame: per column, the deepest of the strongest horizontal ridges in the upper
    half of the fan, in columns where it casts no shadow (a rib's bright arc does), then a robust quadratic through
    those rows (a convex probe draws the pleura as an arc). NaN outside the columns where it is seen."""
    height, width = image.shape
    rows_in_fan = np.flatnonzero(fan.any(axis=1))
    if len(rows_in_fan) < 8:
        raise ValueError("no scan fan found in the image")
    top, depth = rows_in_fan[0], rows_in_fan[-1] - rows_in_fan[0] + 1
    scale = max(1.0, height / 128)
    grey = np.where(fan, image.astype(np.float32) / 255, 0)
    ridge = -ndimage.gaussian_filter(grey, (scale, 3 * scale), order=(2, 0))
    smooth = ndimage.gaussian_filter(grey, (scale, 3 * scale))
    gap, span = max(2, round(0.04 * depth)), max(3, round(0.12 * depth))
    sums = np.vstack([np.zeros((1, width)), np.cumsum(smooth, axis=0)])
    start = np.clip(np.arange(height) + gap, 0, height)
    stop = np.clip(start + span, 0, height)
    below = (sums[stop] - sums[start]) / np.maximum(stop - start, 1)[:, None]
    window = np.zeros_like(fan)
    window[top + round(0.04 * depth): top + round(0.55 * depth)] = True
    # a ridge over an anechoic shadow is a rib (or the fan's own edge), not the pleura
    lit = below > 0.6 * (0.35 * smooth + 1e-3)
    # only crests in depth count: the window's first rows, on the flank of the bright skin line, are not a line
    crest = np.zeros_like(fan)
    crest[1:-1] = (ridge[1:-1] >= ridge[:-2]) & (ridge[1:-1] >= ridge[2:])
    score = np.where(window & fan & crest, ridge * smooth, -np.inf)  # the pleura is bright, not only sharp
    # of the lines nearly as strong as the strongest, the pleura is the deepest: skin and fascia lie above it
    flat = ridge <= MIN_RIDGE * grey[fan].mean()
    strong = (score >= PLEURA_STRENGTH * score.max(axis=0)) & (score > 0) & lit & ~flat
    columns = np.flatnonzero(strong.any(axis=0))
    if len(columns) < max(4, width // 16):
        raise ValueError("no pleural line found")
    rows = (height - 1 - np.argmax(strong[::-1], axis=0))[columns]
    weights = score[rows, columns]
    rows = rows.astype(np.float64)
    # start from the rows near the weighted median: fascia, A-lines and bronchograms are a minority
    order = np.argsort(rows)
    median = rows[order][np.searchsorted(np.cumsum(weights[order]), weights.sum() / 2)]
    keep = np.abs(rows - median) <= max(2 * scale, 0.08 * depth)
    for _ in range(4):  # refit without the outliers (bronchograms, fascia, a rib edge) of the previous fit
        if keep.sum() < 4:
            raise ValueError("no pleural line found")
        coefficients = np.polyfit(columns[keep], rows[keep], 2, w=np.sqrt(weights[keep]))
        residual = np.abs(np.polyval(coefficients, columns) - rows)
        keep = residual <= max(scale, 2.5 * 1.4826 * np.median(residual[keep]))
    seen = np.zeros(width, dtype=bool)
    seen[columns[keep][0]: columns[keep][-1] + 1] = True
    fitted = np.polyval(coefficients, np.arange(width))
    inside = seen & fan[np.clip(np.rint(fitted).astype(int), 0, height - 1), np.arange(width)]
    return np.where(inside, fitted, np.nan)


def detect_anatomy(image: np.ndarray) -> Anatomy:
    fan = scan_region(image[None])
    pleura = detect_pleura(image, fan)
    if np.isfinite(pleura).sum() < 4:
        raise ValueError("no pleural line found inside the fan")
    return Anatomy(fan, pleura)


def placement_anatomy(image: np.ndarray, typical_depth: float) -> Anatomy:
    """The frame's fan and pleura for placing a lesion; where no pleural line is found (a poor generated
    background), a flat line at ``typical_depth`` (fraction of the height) across the fan, so a lesion still lands
    at a typical place."""
    try:
        return detect_anatomy(image)
    except ValueError:
        fan = scan_region(image[None])
        fan = fan if fan.sum() > image.size // 4 else np.ones_like(fan)
        return Anatomy(fan, np.where(fan.any(axis=0), typical_depth * image.shape[0], np.nan))


def anatomy_overlay(image: np.ndarray, boxes: list[Box] = ()) -> np.ndarray:
    """A uint8 frame in colour with the detected fan's outline (green), its pleural line (red) and ``boxes``
    (yellow); a magenta corner where no pleural line is found. On real frames the detector can be wrong and
    cannot tell, so a bank's offsets are only as good as these lines look."""
    rgb = np.repeat(image[..., None], 3, axis=-1)
    try:
        anatomy = detect_anatomy(image)
    except ValueError:
        rgb[:8, :8] = NOT_FOUND_COLOUR
    else:
        rgb[anatomy.fan & ~ndimage.binary_erosion(anatomy.fan)] = FAN_COLOUR
        columns = anatomy.columns
        rows = np.rint(anatomy.pleura[columns]).astype(int)
        for shift in (-1, 0, 1):
            rgb[np.clip(rows + shift, 0, len(rgb) - 1), columns] = PLEURA_COLOUR
    height, width = image.shape
    for x0, y0, x1, y1 in boxes:  # clipped: the outline of whatever part of the box is in the frame
        x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
        x1, y1 = min(max(x1, x0 + 1), width), min(max(y1, y0 + 1), height)
        rgb[[y0, y1 - 1], x0:x1] = BOX_COLOUR
        rgb[y0:y1, [x0, x1 - 1]] = BOX_COLOUR
    return rgb


def structure_map(image: np.ndarray, box: Box, size: int) -> np.ndarray:
    """The lesion's internal pattern inside ``box`` at ``size``×``size``, in [-1, 1]: a difference of Gaussians
    (drops speckle and the overall brightness) scaled by its 95th percentile, so hyper-echoic structure (air
    bronchograms, shred edges) is positive and hypo-echoic fluid negative."""
    x0, y0, x1, y1 = box
    patch = Image.fromarray(image[y0:y1, x0:x1].astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR)
    patch = np.asarray(patch, dtype=np.float32)
    band = ndimage.gaussian_filter(patch, 1.0) - ndimage.gaussian_filter(patch, size / 8)
    return np.clip(band / (np.percentile(np.abs(band), 95) + 1e-6), -1, 1).astype(np.float32)


def render_condition(shape: tuple[int, int], boxes: list[Box], structures: list[np.ndarray] | None) -> np.ndarray:
    """The ControlNet condition of lesions at ``boxes``, ``(H, W)`` in [0, 1]: each structure map resized into its
    box as ``0.5 + 0.5 · map`` (so the box reads as a region and its pattern as contrast), or, without
    structures, the filled boxes (the paper's binary baseline)."""
    condition = np.zeros(shape, dtype=np.float32)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        if structures is None:
            condition[y0:y1, x0:x1] = 1
            continue
        resized = Image.fromarray(structures[k].astype(np.float32)).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
        condition[y0:y1, x0:x1] = 0.5 + 0.5 * np.clip(np.asarray(resized), -1, 1)
    return condition


@dataclass(frozen=True)
class Lesion:
    image: str
    patient_id: str
    box: Box
    anchor: tuple[float, float]  # the image's (X, Y), fractions of its width and height
    lateral: float  # box centre from the anchor column, in half-widths of the detected pleural line
    depth: float  # box top below the highest pleura row over the box, fraction of the image height
    width: float  # box size, fractions of the image width and height
    height: float


def lesion_in(image: str, patient_id: str, box: Box, anatomy: Anatomy) -> Lesion:
    height, width = anatomy.fan.shape
    x0, y0, x1, y1 = box
    centre = (x0 + x1) / 2
    return Lesion(image, patient_id, list(box), anatomy.anchor, (centre - anatomy.centre) / anatomy.half_width,
                  (y0 - anatomy.pleura_top(x0, x1)) / height, (x1 - x0) / width, (y1 - y0) / height)


def lesion_images(data: str | Path, label: str, split: str) -> list[tuple[str, str, np.ndarray, list[Box]]]:
    """``(name, patient, uint8 image, boxes)`` of the ``label`` images with boxes in ``split`` of a dataset."""
    data = Path(data)
    records = [r for r in read_manifest(data) if r.label == label and r.split == split and r.boxes]
    if not records:
        raise ValueError(f"{data} has no {split} images of label {label!r} with boxes to build a lesion bank from")
    return [(r.image, r.patient_id, load_grey(data / r.image), r.boxes) for r in records]


class LesionBank:
    """Lesions with their structure maps and anatomical offsets; ``sample`` places one on a new anatomy."""

    def __init__(self, lesions: list[Lesion], structures: np.ndarray, image_size: int, source: dict,
                 bandwidth: float = 0.05):
        if not lesions:
            raise ValueError("a lesion bank needs at least one lesion box")
        if len(structures) != len(lesions):
            raise ValueError(f"{len(lesions)} lesions but {len(structures)} structure maps")
        self.lesions, self.structures, self.image_size = lesions, structures, image_size
        self.source, self.bandwidth = source, bandwidth
        areas = np.array([lesion.width * lesion.height for lesion in lesions])
        self.large_area = float(np.quantile(areas, LARGE_QUANTILE))
        self.large = areas >= self.large_area

    @classmethod
    def build(cls, data: str | Path, label: str = "consolidation", split: str = "train", structure_size: int = 32,
              bandwidth: float = 0.05) -> LesionBank:
        """From the boxes of ``label`` images in ``split`` of a prepared dataset."""
        return cls.from_images(lesion_images(data, label, split), {"data": str(data), "label": label, "split": split},
                               structure_size, bandwidth)

    @classmethod
    def from_images(cls, entries: list[tuple[str, str, np.ndarray, list[Box]]], source: dict,
                    structure_size: int = 32, bandwidth: float = 0.05) -> LesionBank:
        """From ``(name, patient, uint8 image, boxes)`` of one size; images whose pleural line cannot be found
        are listed in ``source["skipped"]``."""
        sizes = {image.shape for _, _, image, _ in entries}
        if len(sizes) != 1 or len(next(iter(sizes))) != 2 or len(set(next(iter(sizes)))) != 1:
            raise ValueError(f"a lesion bank is built from square images of one size (a prepared dataset), got "
                             f"sizes {sorted(sizes)}")
        lesions, structures, skipped = [], [], []
        for name, patient, image, boxes in entries:
            try:
                anatomy = detect_anatomy(image)
            except ValueError as err:
                skipped.append({"image": name, "reason": str(err)})
                continue
            for box in boxes:
                lesions.append(lesion_in(name, patient, box, anatomy))
                structures.append(structure_map(image, box, structure_size))
        source = {**source, "images": len(entries), "skipped": skipped}
        if not lesions:
            raise ValueError(f"no pleural line found in any of the {len(entries)} lesion images: {skipped[:3]}")
        return cls(lesions, np.stack(structures).astype(np.float16), next(iter(sizes))[0], source, bandwidth)

    # persistence ---------------------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / STRUCTURES, self.structures)
        (folder / LESIONS).write_text(json.dumps({
            "image_size": self.image_size, "bandwidth": self.bandwidth, "source": self.source,
            "statistics": self.statistics(), "lesions": [asdict(lesion) for lesion in self.lesions]}, indent=1) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> LesionBank:
        folder = Path(folder)
        if not (folder / LESIONS).is_file():
            raise FileNotFoundError(f"{folder / LESIONS} not found: not a lesion bank (build one with "
                                    "`sonogen data lesion-bank DATA OUT`)")
        saved = json.loads((folder / LESIONS).read_text())
        lesions = [Lesion(**{**lesion, "anchor": tuple(lesion["anchor"])}) for lesion in saved["lesions"]]
        return cls(lesions, np.load(folder / STRUCTURES), saved["image_size"], saved["source"], saved["bandwidth"])

    @property
    def typical_depth(self) -> float:
        """The median pleura row of the lesion images, as a fraction of the height."""
        return float(np.median([lesion.anchor[1] for lesion in self.lesions]))

    def statistics(self) -> dict:
        def summary(values) -> dict[str, float]:
            q = np.quantile(values, [0.05, 0.5, 0.95])
            return {"mean": float(np.mean(values)), "q05": float(q[0]), "median": float(q[1]), "q95": float(q[2])}

        return {"lesions": len(self.lesions), "patients": len({lesion.patient_id for lesion in self.lesions}),
                "large_area": self.large_area, "large_fraction": float(self.large.mean()),
                **{name: summary([getattr(lesion, name) for lesion in self.lesions])
                   for name in ("lateral", "depth", "width", "height")}}

    # sampling ------------------------------------------------------------------------------------------------

    def weights(self, anchor: tuple[float, float], size_bias: str = "none") -> np.ndarray:
        """``P(lesion | X, Y)``: a Gaussian kernel on the distance between anchors (Nadaraya–Watson), with large
        lesions re-weighted to half the mass under ``size_bias="large"``."""
        if size_bias not in SIZE_BIASES:
            raise ValueError(f"size_bias must be one of {SIZE_BIASES}, got {size_bias!r}")
        anchors = np.array([lesion.anchor for lesion in self.lesions])
        weights = np.exp(-0.5 * ((anchors - np.array(anchor)) ** 2).sum(axis=1) / self.bandwidth**2) + 1e-12
        if size_bias == "large" and 0 < self.large.sum() < len(self.lesions):
            weights = np.where(self.large, weights / weights[self.large].sum(), weights / weights[~self.large].sum())
        return weights / weights.sum()

    def sample(self, anatomy: Anatomy, rng: np.random.Generator, size_bias: str = "none") -> tuple[Box, int]:
        """A lesion box on ``anatomy`` and the index of the bank lesion whose structure it takes: a lesion drawn
        from the conditional, its size jittered by ~10% and its offsets by one kernel bandwidth, kept when the box
        lies inside the fan and starts below the pleura (else drawn again)."""
        height, width = anatomy.fan.shape
        weights = self.weights(anatomy.anchor, size_bias)
        for _ in range(PLACEMENT_TRIES):
            index = int(rng.choice(len(self.lesions), p=weights))
            lesion = self.lesions[index]
            w = max(2, round(lesion.width * width * np.exp(0.1 * rng.standard_normal())))
            h = max(2, round(lesion.height * height * np.exp(0.1 * rng.standard_normal())))
            centre = anatomy.centre + (lesion.lateral + self.bandwidth * rng.standard_normal()) * anatomy.half_width
            x0 = round(centre - w / 2)
            if not 0 <= x0 <= width - w:
                continue
            depth = max(lesion.depth + 0.25 * self.bandwidth * rng.standard_normal(), 0.0)
            y0 = round(anatomy.pleura_top(x0, x0 + w) + depth * height)
            if y0 + h <= height and anatomy.fan[y0:y0 + h, x0:x0 + w].mean() >= 0.9:
                return [x0, y0, x0 + w, y0 + h], index
        raise ValueError(f"no lesion of the bank fits this anatomy in {PLACEMENT_TRIES} tries (fan too small?)")
