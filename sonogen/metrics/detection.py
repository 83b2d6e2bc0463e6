"""Lesion detection as a downstream gate: a small CenterNet-style detector in plain torch (a heat map of box
centres with size and offset heads, Zhou et al. 2019), mean AP from pycocotools, and the comparison the
DiffUltra paper makes: a detector trained on real boxes against one trained on real plus synthetic boxes,
over several seeds, on a real held-out set.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sonogen.metrics.downstream import patient_resamples

STRIDE = 4
Boxes = list[list[float]]


@dataclass
class DetectorConfig:
    steps: int = 600
    batch_size: int = 16
    lr: float = 2e-3
    width: int = 32
    seed: int = 0

    def __post_init__(self):
        if min(self.steps, self.batch_size, self.width) < 1 or self.lr <= 0:
            raise ValueError("steps, batch_size and width must be ≥ 1 and lr > 0")


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class CenterNet(nn.Module):
    """Stride-4 features from a small conv stack with a wider context branch, then three 1×1 heads: centre heat
    map (logits), box size (log pixels) and the centre's sub-cell offset."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(_block(1, width, 2), _block(width, width, 1), _block(width, 2 * width, 2),
                                  _block(2 * width, 2 * width, 1))
        self.context = nn.Sequential(_block(2 * width, 2 * width, 2), _block(2 * width, 2 * width, 1))
        self.fuse = _block(4 * width, 2 * width, 1)
        self.heatmap = nn.Conv2d(2 * width, 1, 1)
        self.size = nn.Conv2d(2 * width, 2, 1)
        self.offset = nn.Conv2d(2 * width, 2, 1)
        nn.init.constant_(self.heatmap.bias, -2.19)  # a prior of 0.1 on every cell keeps the focal loss stable

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.stem(images)
        context = F.interpolate(self.context(features), size=features.shape[-2:], mode="bilinear", align_corners=False)
        features = self.fuse(torch.cat([features, context], dim=1))
        return self.heatmap(features), self.size(features), self.offset(features)


def _targets(boxes: list[Boxes], side: int) -> tuple[torch.Tensor, ...]:
    """Gaussian centre heat maps, and size / offset targets on each centre cell, for images of ``side`` px."""
    cells = side // STRIDE
    heat = torch.zeros(len(boxes), 1, cells, cells)
    size, offset, where = torch.zeros(len(boxes), 2, cells, cells), torch.zeros(len(boxes), 2, cells, cells), \
        torch.zeros(len(boxes), 1, cells, cells)
    ys, xs = torch.meshgrid(torch.arange(cells), torch.arange(cells), indexing="ij")
    for k, image_boxes in enumerate(boxes):
        for x0, y0, x1, y1 in image_boxes:
            cx, cy = (x0 + x1) / 2 / STRIDE, (y0 + y1) / 2 / STRIDE
            ix, iy = min(int(cx), cells - 1), min(int(cy), cells - 1)
            sigma = max(0.7, min(x1 - x0, y1 - y0) / STRIDE / 6)
            heat[k, 0] = torch.maximum(heat[k, 0], torch.exp(-((xs - ix) ** 2 + (ys - iy) ** 2) / (2 * sigma**2)))
            size[k, :, iy, ix] = torch.tensor([np.log(max(x1 - x0, 1.0)), np.log(max(y1 - y0, 1.0))])
            offset[k, :, iy, ix] = torch.tensor([cx - ix, cy - iy])
            where[k, 0, iy, ix] = 1
    return heat, size, offset, where


def _focal_loss(logits: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss (α = 2, β = 4), per object."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    positive = heat.eq(1).float()
    loss = -(positive * (1 - p) ** 2 * torch.log(p) + (1 - positive) * (1 - heat) ** 4 * p**2 * torch.log(1 - p))
    return loss.sum() / positive.sum().clamp(min=1)


def train_detector(images: torch.Tensor, boxes: list[Boxes], config: DetectorConfig,
                   device: str | torch.device = "cpu") -> CenterNet:
    """A detector trained on ``images`` ``(N, 1, S, S)`` in [-1, 1] and their boxes (images without boxes are
    negatives), with horizontal flips; deterministic for a seed on the CPU."""
    if images.shape[-1] % STRIDE or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"detector images must be square with a side divisible by {STRIDE}, got {tuple(images.shape)}")
    if len(images) != len(boxes):
        raise ValueError(f"{len(images)} images but {len(boxes)} box lists")
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    model = CenterNet(config.width).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    warm_up = max(1, config.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warm_up)
                                                 * 0.5 * (1 + np.cos(np.pi * min(step, config.steps) / config.steps)))
    side = images.shape[-1]
    flipped = [[[side - x1, y0, side - x0, y1] for x0, y0, x1, y1 in b] for b in boxes]
    targets = [torch.cat(pair) for pair in zip(_targets(boxes, side), _targets(flipped, side))]
    images = torch.cat([images, images.flip(-1)])
    model.train()
    for _ in range(config.steps):
        index = torch.randint(len(images), (config.batch_size,), generator=generator)
        heat, size, offset, where = (t[index].to(device) for t in targets)
        logits, size_pred, offset_pred = model(images[index].to(device))
        objects = where.sum().clamp(min=1)
        loss = (_focal_loss(logits, heat) + 0.1 * (F.l1_loss(size_pred * where, size * where, reduction="sum") / objects)
                + (F.l1_loss(offset_pred * where, offset * where, reduction="sum") / objects))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def detect(model: CenterNet, images: torch.Tensor, max_detections: int = 10,
           threshold: float = 0.01) -> list[tuple[Boxes, list[float]]]:
    """Boxes ``[x0, y0, x1, y1]`` (pixels) and scores per image: heat-map peaks (3×3 max-pooling is the NMS)."""
    device = next(model.parameters()).device
    logits, size, offset = model(images.to(device))
    heat = torch.sigmoid(logits)
    peaks = heat * (F.max_pool2d(heat, 3, 1, 1) == heat)
    results = []
    cells = heat.shape[-1]
    for k in range(len(images)):
        scores, index = peaks[k, 0].flatten().topk(min(max_detections, cells * cells))
        detections: Boxes = []
        kept = []
        for score, cell in zip(scores.tolist(), index.tolist()):
            if score < threshold:
                break
            iy, ix = divmod(cell, cells)
            cx = (ix + offset[k, 0, iy, ix].item()) * STRIDE
            cy = (iy + offset[k, 1, iy, ix].item()) * STRIDE
            w, h = np.exp(size[k, 0, iy, ix].item()), np.exp(size[k, 1, iy, ix].item())
            detections.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
            kept.append(score)
        results.append((detections, kept))
    return results


def average_precision(predictions: list[tuple[Boxes, list[float]]], truths: list[Boxes],
                      large_area: float | None = None) -> dict[str, float]:
    """COCO mean AP (pycocotools) of one class: ``ap`` over IoU 0.5:0.95 and ``ap50``, and both for boxes of
    area ≥ ``large_area`` (``ap_large``, ``ap50_large``); -1 where there is no ground truth to score."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions but {len(truths)} images of ground truth")
    annotations, detections = [], []
    for image_id, (boxes, (predicted, scores)) in enumerate(zip(truths, predictions)):
        for x0, y0, x1, y1 in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float((x1 - x0) * (y1 - y0))})
        for (x0, y0, x1, y1), score in zip(predicted, scores):
            detections.append({"image_id": image_id, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                               "score": float(score)})
    ranges = {"all": [0, 1e10]} | ({"large": [large_area, 1e10]} if large_area is not None else {})
    results = {}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools narrates every phase
        truth = COCO()
        truth.dataset = {"images": [{"id": k} for k in range(len(truths))], "annotations": annotations,
                         "categories": [{"id": 1, "name": "lesion"}]}
        truth.createIndex()
        found = truth.loadRes(detections) if detections else COCO()
        if not detections:
            found.dataset = {"images": truth.dataset["images"], "annotations": [], "categories": truth.dataset["categories"]}
            found.createIndex()
        evaluation = COCOeval(truth, found, "bbox")
        evaluation.params.areaRng, evaluation.params.areaRngLbl = list(ranges.values()), list(ranges)
        evaluation.params.maxDets = [100]
        evaluation.evaluate()
        evaluation.accumulate()
    precision = evaluation.eval["precision"][:, :, 0, :, 0]  # (IoU thresholds, recall points, area ranges)
    for a, name in enumerate(ranges):
        suffix = "" if name == "all" else f"_{name}"
        scored = precision[:, :, a]
        results[f"ap{suffix}"] = float(scored[scored > -1].mean()) if (scored > -1).any() else -1.0
        at_50 = scored[0]
        results[f"ap50{suffix}"] = float(at_50[at_50 > -1].mean()) if (at_50 > -1).any() else -1.0
    return results


def interval(values: list[float]) -> dict:
    """Mean and a 95% t-interval over seeds, and the seeds' values."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
    return {"mean": float(values.mean()), "low": float(values.mean() - half), "high": float(values.mean() + half),
            "seeds": len(values), "values": values.tolist()}


Predictions = list[tuple[Boxes, list[float]]]


def large_lesion_area(boxes: list[Boxes]) -> float | None:
    """The area from which a lesion counts as large: the top 10 % of the training boxes."""
    areas = [(x1 - x0) * (y1 - y0) for image in boxes for x0, y0, x1, y1 in image]
    return float(np.quantile(areas, 0.9)) if areas else None


def detector_predictions(train: tuple[torch.Tensor, list[Boxes]], test_images: torch.Tensor,
                         synthetic: dict[str, tuple[torch.Tensor, list[Boxes]]], config: DetectorConfig,
                         seeds: int = 3, device: str | torch.device = "cpu") -> dict[str, list[Predictions]]:
    """Per arm (``real``, and ``real+NAME`` per synthetic set) and per seed, the detections on ``test_images`` of
    a detector trained on the real ``train`` set, plus the synthetic set."""
    arms = {"real": train} | {f"real+{name}": (torch.cat([train[0], images]), train[1] + boxes)
                              for name, (images, boxes) in synthetic.items()}
    return {arm: [detect(train_detector(images, boxes, DetectorConfig(**{**config.__dict__, "seed": config.seed + s}),
                                        device), test_images) for s in range(seeds)]
            for arm, (images, boxes) in arms.items()}


def score_predictions(predictions: dict[str, list[Predictions]], truths: list[Boxes],
                      large_area: float | None) -> dict[str, dict[str, dict]]:
    """Each arm's AP metrics, mean and 95 % interval over its seeds."""
    report = {}
    for arm, runs in predictions.items():
        scores = [average_precision(run, truths, large_area) for run in runs]
        report[arm] = {metric: interval([score[metric] for score in scores]) for metric in scores[0]}
    return report


def detection_comparison(train: tuple[torch.Tensor, list[Boxes]], test: tuple[torch.Tensor, list[Boxes]],
                         synthetic: dict[str, tuple[torch.Tensor, list[Boxes]]], config: DetectorConfig,
                         seeds: int = 3, large_area: float | None = None,
                         device: str | torch.device = "cpu") -> dict[str, dict[str, dict[str, float]]]:
    """AP on the real ``test`` set of detectors trained on the real ``train`` set (arm ``real``) and on it plus
    each synthetic set (arm ``real+NAME``), one detector per seed; large lesions by area ≥ ``large_area``
    (default: the top 10% of the training boxes)."""
    large_area = large_lesion_area(train[1]) if large_area is None else large_area
    return score_predictions(detector_predictions(train, test[0], synthetic, config, seeds, device), test[1],
                             large_area)


def pooled_detection(truths: list[Boxes], patients: list[str], predictions: dict[str, list[Predictions]],
                     baseline: str, augmented: str, resamples: int = 1000, seed: int = 0) -> dict:
    """AP50 and AP of out-of-fold detections pooled over folds: each arm's value is the mean over seeds of the AP
    of its pooled detections; each delta (``augmented − baseline``) with a 95 % interval from a patient bootstrap
    (patients with and without lesions resampled separately, the same resample for both arms)."""
    if not any(truths):
        raise ValueError("no test image has a lesion box: detection AP cannot be measured")
    patients = np.asarray(patients)
    groups: dict[bool, list[np.ndarray]] = {False: [], True: []}  # patients without and with a lesion
    for patient in dict.fromkeys(patients.tolist()):
        rows = np.flatnonzero(patients == patient)
        groups[any(truths[i] for i in rows)].append(rows)
    strata = [group for group in groups.values() if group]

    def mean_ap(arm: str, rows: np.ndarray | None = None) -> dict[str, float]:
        picked = (lambda items: items) if rows is None else (lambda items: [items[i] for i in rows])
        scores = [average_precision(picked(run), picked(truths)) for run in predictions[arm]]
        return {metric: float(np.mean([s[metric] for s in scores])) for metric in ("ap50", "ap")}

    values = {arm: mean_ap(arm) for arm in (baseline, augmented)}
    deltas = np.empty((resamples, 2))
    for index, rows in enumerate(patient_resamples(strata, resamples, seed)):
        drawn = {arm: mean_ap(arm, rows) for arm in (baseline, augmented)}
        deltas[index] = [drawn[augmented][m] - drawn[baseline][m] for m in ("ap50", "ap")]
    result = {"images": len(truths), "lesions": int(sum(len(b) for b in truths)), "bootstrap_resamples": resamples,
              "patients_per_class": {"with lesions": len(groups[True]), "without lesions": len(groups[False])}}
    for k, metric in enumerate(("ap50", "ap")):
        result[metric] = {arm: values[arm][metric] for arm in (baseline, augmented)}
        result[f"{metric}_delta"] = values[augmented][metric] - values[baseline][metric]
        result[f"{metric}_delta_ci95"] = [float(np.percentile(deltas[:, k], 2.5)),
                                          float(np.percentile(deltas[:, k], 97.5))]
    return result
