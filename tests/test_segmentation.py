"""Mask adherence: Dice on known maps, and a segmenter trained on phantom masks that tells a sampler which honours
the requested masks from one which ignores them."""

import pytest
import torch

from sonogen.data import UltrasoundDataset
from sonogen.data.phantom import generate
from sonogen.data.prepare import prepare
from sonogen.metrics.segmentation import dice, mask_adherence, pair_fidelity, segmentation_usefulness


def test_dice_on_known_maps():
    a = torch.zeros(3, 1, 4, 4)
    b = torch.zeros(3, 1, 4, 4)
    a[0, 0, :2], b[0, 0, :2] = 1, 1  # identical
    a[1, 0, :2], b[1, 0, 1:3] = 1, 1  # half overlap: 2·4 / (8 + 8)
    assert dice(a, b).tolist() == [1.0, 0.5, 1.0]  # two empty maps agree


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("segment")
    generate(root / "raw", patients=30, frames_per_patient=4, seed=1, consolidation_fraction=0.6)
    prepare(root / "raw", root / "lus", size=32, split="0.6,0.1,0.3", seed=0, stratify=True)

    def split(name):
        dataset = UltrasoundDataset(root / "lus", split=name, with_mask=True)
        items = [dataset[k] for k in range(len(dataset))]
        return torch.stack([i["image"] for i in items]), torch.stack([i["mask"] for i in items])

    return split("train"), split("test")


def test_a_sampler_that_follows_the_masks_scores_near_the_real_ceiling_and_one_that_ignores_them_low(pairs):
    (train_images, train_masks), (test_images, test_masks) = pairs
    by_mask = {tuple(m.flatten().int().tolist()): image for image, m in zip(test_images, test_masks)}
    honest = mask_adherence(lambda mask, seed: by_mask[tuple(mask.flatten().int().tolist())][None],
                            train_images, train_masks, test_images, test_masks, epochs=40)
    healthy = test_images[test_masks.flatten(1).sum(1) == 0][0]
    ignoring = mask_adherence(lambda mask, seed: healthy[None], train_images, train_masks, test_images, test_masks,
                              epochs=40)
    assert honest["mask_dice_real"] > 0.4 and honest["mask_requests"] > 0
    # answered with the real frames of its masks, a sampler reaches the segmenter's own ceiling; one healthy
    # frame for every mask scores only the segmenter's false positives on it
    assert honest["mask_dice"] == pytest.approx(honest["mask_dice_real"])
    assert ignoring["mask_dice"] < honest["mask_dice"] - 0.15
    assert honest["mask_dice_gain"] > 0.1 and abs(ignoring["mask_dice_gain"]) < 1e-6


def test_a_sampler_that_draws_lesions_where_they_usually_are_gains_nothing_over_chance(pairs):
    (train_images, train_masks), (test_images, test_masks) = pairs
    lesion_images = test_images[test_masks.flatten(1).sum(1) > 0]
    # request k (seed k) is answered with a real lesion frame from half the list away: another patient's lesion
    half = len(lesion_images) // 2
    ignoring = mask_adherence(lambda mask, seed: lesion_images[(seed + half) % len(lesion_images)][None],
                              train_images, train_masks, test_images, test_masks, epochs=40)
    assert ignoring["mask_dice"] > 0.2  # lesions overlap by where they usually are
    assert ignoring["mask_dice_gain"] < 0.05


def test_pairs_read_where_their_masks_say_and_wrong_pairs_hurt_a_segmenter_of_real_pairs(pairs):
    (train_images, train_masks), (test_images, test_masks) = pairs
    lesion = test_masks.flatten(1).sum(1) > 0
    real_pairs = pair_fidelity(test_images[lesion], test_masks[lesion], train_images, train_masks, test_images,
                               test_masks, epochs=40)
    assert real_pairs["mask_dice"] == pytest.approx(real_pairs["mask_dice_real"])  # real pairs: the ceiling
    assert real_pairs["mask_dice_gain"] > 0.1

    # pairs whose masks mark everything but the lesion teach the opposite of what the real ones do
    wrong = segmentation_usefulness(train_images, train_masks, train_images.repeat(3, 1, 1, 1),
                                    1 - train_masks.repeat(3, 1, 1, 1), test_images[lesion], test_masks[lesion],
                                    [f"p{k // 2}" for k in range(int(lesion.sum()))], seeds=2, epochs=20,
                                    resamples=200)
    assert wrong["seg_dice"]["real"] > 0.4 and wrong["seg_dice_delta"] < -0.2
    low, high = wrong["seg_dice_delta_ci95"]
    assert low <= wrong["seg_dice_delta"] <= high < 0 and wrong["test_patients"] == (int(lesion.sum()) + 1) // 2
