"""The detection gate: COCO AP on boxes with known answers, and the CenterNet-style detector on toy lesions."""

import pytest
import torch

from sonogen.metrics.detection import (
    DetectorConfig, average_precision, detect, detection_comparison, interval, train_detector,
)


def test_average_precision_has_the_known_coco_answers():
    truths = [[[10, 10, 20, 20]], [[5, 5, 15, 25]]]
    perfect = [([[10, 10, 20, 20]], [0.9]), ([[5, 5, 15, 25]], [0.8])]
    assert average_precision(perfect, truths) == pytest.approx({"ap": 1.0, "ap50": 1.0})
    # shifted by 2.3 px: IoU 0.626 passes the thresholds 0.5, 0.55 and 0.6 of the ten
    shifted = [([[12.3, 10, 22.3, 20]], [0.9]), ([[7.3, 5, 17.3, 25]], [0.8])]
    iou = 7.7 * 10 / (200 - 77)
    assert 0.6 < iou < 0.65
    assert average_precision(shifted, truths) == pytest.approx({"ap": 0.3, "ap50": 1.0})
    # a false positive ranked first: precision 1/2 at recall 1/2, 2/3 at recall 1, interpolated to 2/3 throughout
    ranked = [([[40, 40, 50, 50], [10, 10, 20, 20]], [0.9, 0.8]), ([[5, 5, 15, 25]], [0.7])]
    assert average_precision(ranked, truths)["ap50"] == pytest.approx(2 / 3)
    assert average_precision([([], []), ([], [])], truths) == {"ap": 0.0, "ap50": 0.0}
    # a found large box and a missed small one: half the recall overall, all of it among large boxes
    mixed_truths = [[[0, 0, 30, 30]], [[5, 5, 9, 9]]]
    found = average_precision([([[0, 0, 30, 30]], [0.9]), ([], [])], mixed_truths, large_area=400)
    assert found["ap50"] == pytest.approx(51 / 101) and found["ap50_large"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="predictions"):
        average_precision(perfect[:1], truths)


def _toy(count: int, seed: int) -> tuple[torch.Tensor, list]:
    """Noisy 32 px frames, most with one bright rectangle of random size and place."""
    generator = torch.Generator().manual_seed(seed)
    images = 0.3 * torch.randn(count, 1, 32, 32, generator=generator) - 0.5
    boxes = []
    for k in range(count):
        if k % 4 == 3:
            boxes.append([])
            continue
        w, h = torch.randint(6, 14, (2,), generator=generator).tolist()
        x0, y0 = torch.randint(0, 32 - w, (1,), generator=generator).item(), torch.randint(0, 32 - h, (1,), generator=generator).item()
        images[k, 0, y0:y0 + h, x0:x0 + w] += 1.2
        boxes.append([[x0, y0, x0 + w, y0 + h]])
    return images, boxes


def test_the_detector_learns_toy_lesions_and_the_comparison_reports_intervals():
    train_images, train_boxes = _toy(64, seed=0)
    test_images, test_boxes = _toy(24, seed=1)
    config = DetectorConfig(steps=200, batch_size=16, width=16)
    model = train_detector(train_images, train_boxes, config)
    scores = average_precision(detect(model, test_images), test_boxes)
    assert scores["ap50"] > 0.8 and scores["ap"] > 0.3
    untrained = average_precision(detect(train_detector(train_images, train_boxes, DetectorConfig(steps=1, width=16)),
                                         test_images), test_boxes)
    assert untrained["ap50"] < 0.5
    same = detect(train_detector(train_images, train_boxes, config), test_images)
    assert same == detect(model, test_images)  # a seed fixes the detector

    extra = _toy(32, seed=2)
    report = detection_comparison((train_images[:16], train_boxes[:16]), (test_images, test_boxes), {"toy": extra},
                                  DetectorConfig(steps=60, batch_size=8, width=8), seeds=2)
    assert set(report) == {"real", "real+toy"}
    for arm in report.values():
        assert set(arm) == {"ap", "ap50", "ap_large", "ap50_large"}
        assert arm["ap50"]["low"] <= arm["ap50"]["mean"] <= arm["ap50"]["high"] and arm["ap50"]["seeds"] == 2


def test_interval_and_invalid_inputs():
    assert interval([0.5, 0.5, 0.5]) == {"mean": 0.5, "low": 0.5, "high": 0.5, "seeds": 3, "values": [0.5, 0.5, 0.5]}
    spread = interval([0.4, 0.6])
    assert spread["low"] < 0.4 and spread["high"] > 0.6  # two seeds: a wide t-interval
    with pytest.raises(ValueError, match="divisible"):
        train_detector(torch.zeros(2, 1, 30, 30), [[], []], DetectorConfig(steps=1))
    with pytest.raises(ValueError, match="box lists"):
        train_detector(torch.zeros(2, 1, 32, 32), [[]], DetectorConfig(steps=1))
    with pytest.raises(ValueError, match="steps"):
        DetectorConfig(steps=0)
