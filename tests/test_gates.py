"""The gate suite: SSIM against scikit-image, the classifier, downstream usefulness, gate logic, and generators
that must fail (a memorising one, a noise one) next to real held-out images that must pass."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sonogen.cli import app
from sonogen.data.phantom import generate
from sonogen.data.prepare import prepare
from sonogen.evaluation import evaluate_folders, split_images
from sonogen.gates import EvaluateConfig, apply_gates, check_gates, evaluate_images, gates_for
from sonogen.generators import register_family, to_uint8
from sonogen.jobs import evaluation_config
from sonogen.metrics.classifier import (
    ClassifierConfig, load_classifier, predict_proba, save_classifier, train_classifier,
)
from sonogen.metrics.augment import AUGMENTATIONS, Augmenter
from sonogen.metrics.downstream import DownstreamConfig, downstream_usefulness
from sonogen.metrics.protocols import search_space
from sonogen.metrics.features import get_extractor, pixel_extractor
from sonogen.metrics.similarity import mean_pairwise_ms_ssim, ms_ssim, ms_ssim_scales

# thresholds on pixels-16 features between the phantom's real held-out patients and its noise images
PIXEL_GATES = {"extractor": "pixels-16", "max_kmmd": 0.5, "max_fid": 100.0, "max_near_copy_fraction": 0.05,
               "max_pixel_near_copy_fraction": 0.05}


@pytest.fixture(scope="module")
def lus(tmp_path_factory):
    root = tmp_path_factory.mktemp("gates")
    generate(root / "raw", patients=16, frames_per_patient=3, seed=0)
    prepare(root / "raw", root / "lus", size=32, stratify=True)
    return root / "lus"


def _folder(path, images):
    path.mkdir(parents=True)
    for k, image in enumerate(to_uint8(images)):
        Image.fromarray(image).save(path / f"{k:03d}.png")
    return path


def test_ssim_agrees_with_scikit_image_inside_the_border():
    from skimage.metrics import structural_similarity
    from torchmetrics.functional.image import structural_similarity_index_measure

    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 1, 40, 40, generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(2, 1, 40, 40, generator=g)).clamp(-1, 1)
    _, ours = structural_similarity_index_measure(a, b, data_range=2.0, return_full_image=True)
    for k in range(2):
        _, reference = structural_similarity(a[k, 0].double().numpy(), b[k, 0].double().numpy(), data_range=2.0,
                                             gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True)
        # the libraries pad the border differently (torch reflect vs scipy half-sample); the interior is the same
        np.testing.assert_allclose(ours[k, 0, 5:-5, 5:-5].numpy(), reference[5:-5, 5:-5], atol=1e-5)


def test_ms_ssim_scales_with_size_and_measures_diversity():
    assert [ms_ssim_scales(s) for s in (32, 64, 128, 256)] == [2, 3, 4, 5]
    g = torch.Generator().manual_seed(1)
    images = torch.rand(6, 1, 64, 64, generator=g) * 2 - 1
    assert ms_ssim(images, images) == pytest.approx(torch.ones(6), abs=1e-5)
    assert mean_pairwise_ms_ssim(images[:1].repeat(5, 1, 1, 1)) == pytest.approx(1.0, abs=1e-5)  # collapse
    assert mean_pairwise_ms_ssim(images) < 0.2


def test_classifier_learns_the_phantom_and_round_trips(lus, tmp_path):
    images, labels, _ = split_images(lus, "train")
    classes = sorted(set(labels))
    model = train_classifier(images, torch.tensor([classes.index(x) for x in labels]),
                             ClassifierConfig(classes=classes, epochs=30, seed=0))
    predicted = predict_proba(model, images).argmax(1)
    # eval mode must keep what training learned (BatchNorm statistics of a few steps did not)
    assert np.mean([classes[k] == truth for k, truth in zip(predicted, labels)]) >= 0.9
    test, _, _ = split_images(lus, "test")
    loaded, extra = load_classifier(save_classifier(model, tmp_path / "c", {"version": "3"}))
    assert extra == {"version": "3"} and torch.equal(predict_proba(loaded, test), predict_proba(model, test))
    with pytest.raises(ValueError, match="two distinct classes"):
        ClassifierConfig(classes=["normal"])


def test_the_papers_augmentations_repeat_per_seed_and_stay_in_range():
    images = torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def run(names, seed):
        return Augmenter(names, seed)(images, torch.Generator().manual_seed(seed))

    every = run(AUGMENTATIONS, 1)
    assert torch.equal(every, run(AUGMENTATIONS, 1)) and not torch.equal(every, run(AUGMENTATIONS, 2))
    assert every.min() >= -1 and every.max() <= 1 and not torch.equal(every, images)
    flips = run(["flip"], 3)  # flips only: each image is itself or its mirror
    assert all(torch.equal(a, b) or torch.equal(a, b.flip(-1)) for a, b in zip(flips, images))
    with pytest.raises(ValueError, match="known: flip, gamma, blur, intensity"):
        ClassifierConfig(classes=["a", "b"], augmentations=["rotate"])


def test_validation_keeps_the_best_epoch_and_says_which(lus):
    images, labels, _ = split_images(lus, "train")
    classes = sorted(set(labels))
    targets = torch.tensor([classes.index(x) for x in labels])
    readings = iter([0.6, 0.9, 0.7, 0.5])  # the validation metric worsens after epoch 2
    config = ClassifierConfig(classes=classes, epochs=4, seed=0, augmentations=list(AUGMENTATIONS))
    chosen = train_classifier(images, targets, config, validate=lambda model: next(readings))
    assert chosen.selected == {"epoch": 2, "score": 0.9}
    two_epochs = train_classifier(images, targets, ClassifierConfig(**{**config.__dict__, "epochs": 2}))
    assert torch.equal(predict_proba(chosen, images), predict_proba(two_epochs, images))


def test_downstream_reports_auc_per_condition_with_a_patient_bootstrap(lus, monkeypatch):
    from sonogen.metrics import downstream

    train, train_labels, _ = split_images(lus, "train")
    test, test_labels, patients = split_images(lus, "test")
    positive = torch.tensor([x == "consolidation" for x in train_labels])
    flipped_positives = train[positive].flip(-1)  # a stand-in generator: mirrored real positives
    config = DownstreamConfig(seeds=3, epochs=8, bootstrap=200)
    fitted = []

    def recording_fit(images, targets, *args):
        fitted.append((images, targets))
        return fit(images, targets, *args)

    fit = downstream._fit
    monkeypatch.setattr(downstream, "_fit", recording_fit)
    result = downstream_usefulness(train, positive, test, torch.tensor([x == "consolidation" for x in test_labels]),
                                   patients, flipped_positives, None, config)
    assert set(result["auc"]) == {"real", "real+synthetic", "real+repeated", "synthetic+real-negatives"}
    # the control: the real set plus as many real positives drawn again as there are synthetic ones
    repeated, targets = fitted[2 * config.seeds]
    extra = repeated[len(train):]
    assert len(extra) == len(flipped_positives) and (targets[len(train):] == 1).all()
    assert all(any(torch.equal(image, real) for real in train[positive]) for image in extra)
    low, high = result["auc_over_repeated_ci95"]
    assert low <= result["auc_over_repeated"] <= high
    assert all(len(v) == 3 for v in result["auc_per_seed"].values())
    assert result["auc"]["real"] >= 0.9  # phantom consolidations are easy to see
    low, high = result["auc_delta_ci95"]
    assert low <= result["auc_delta"] <= high and result["test_patients"] == len(set(patients))
    assert result["skipped_conditions"]
    with pytest.raises(ValueError, match="both positive and negative"):
        downstream_usefulness(train, positive, test, torch.ones(len(test)), patients, flipped_positives, None, config)
    with pytest.raises(ValueError, match="at least 3"):
        DownstreamConfig(seeds=2)
    kept = downstream_usefulness(train, positive, test, torch.ones(len(test)), patients, flipped_positives, None,
                                 config, keep_unmeasurable=True)  # a fold: predictions kept for pooling
    assert "not_measured" in kept and "auc" not in kept and len(kept["probabilities"]["real"]) == 3

    # Yu et al.'s protocol: a search on the validation patients, each classifier at its best validation epoch
    val, val_labels, _ = split_images(lus, "val")
    yu = DownstreamConfig(protocol="yu2023", seeds=3, epochs=3, bootstrap=100)
    with pytest.raises(ValueError, match="val split"):
        downstream_usefulness(train, positive, test, torch.tensor([x == "consolidation" for x in test_labels]),
                              patients, flipped_positives, None, yu)
    result = downstream_usefulness(train, positive, test, torch.tensor([x == "consolidation" for x in test_labels]),
                                   patients, flipped_positives, None, yu,
                                   validation=(val, torch.tensor([x == "consolidation" for x in val_labels])))
    assert result["protocol"] == "yu2023" and set(result["selection"]) == set(result["auc"])
    for arm in result["selection"].values():
        assert len(arm["search_scores"]) == 4 and all(1 <= epoch <= 3 for epoch in arm["epochs"])
        assert arm["hyperparameters"] in search_space(4, 0)


def test_gate_logic_is_strict_about_names_extractors_and_missing_values():
    extractor = pixel_extractor()
    passed, rows = apply_gates({"kmmd": 0.1, "one_nn_acc": 0.9}, {},
                               {"extractor": "pixels-16", "max_kmmd": 0.2, "min_1nn_acc": 0.95}, extractor)
    assert not passed and [r["passed"] for r in rows] == [True, False]
    assert rows[0]["extractor"] == "pixels-16@fixed"
    passed, rows = apply_gates({}, {"confidence": "no classifier"}, {"min_confidence": 0.5}, extractor)
    assert not passed and "not measured: no classifier" in rows[0]["note"]
    assert apply_gates({"kmmd": 9.0}, {}, {}, extractor) == (True, [])
    with pytest.raises(ValueError, match="never gated together"):
        apply_gates({"kmmd": 0.1}, {}, {"extractor": "us-encoder", "max_kmmd": 0.2}, extractor)
    with pytest.raises(ValueError, match="unknown gates"):
        check_gates({"max_kmd": 0.1})
    with pytest.raises(ValueError, match="need the extractor"):
        check_gates({"max_fid": 10})
    with pytest.raises(ValueError, match="unknown feature extractor"):
        get_extractor("vgg")


def test_the_evaluation_device_is_checked_where_the_config_is_read():
    assert EvaluateConfig().device == "auto"
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        evaluation_config({"evaluate": {"device": "gpu"}})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU on this machine"):
            EvaluateConfig(device="cuda")


def test_a_variant_gate_set_adds_to_its_family_and_a_misspelt_variant_is_an_error():
    gates = {"ldm": {"extractor": "us-encoder", "max_kmmd": 0.5, "min_confidence": 0.6},
             "ldm-controlnet": {"min_mask_dice_gain": 0.1, "min_confidence": 0.5}}
    assert gates_for(gates, "ldm-controlnet") == {"extractor": "us-encoder", "max_kmmd": 0.5, "min_confidence": 0.5,
                                                  "min_mask_dice_gain": 0.1}
    assert gates_for(gates, "ldm-from-scratch") == gates["ldm"]
    assert gates_for(gates, "dcgan") == {}
    assert evaluation_config({"gates": {**gates, "outside-folders": {"min_confidence": 0.5}}})[1]["ldm-controlnet"]
    with pytest.raises(ValueError, match="gates.ldm-contrlnet: ldm has no variant 'contrlnet'; its variants: "
                                         "ldm-from-scratch, ldm-fine-tune, ldm-controlnet"):
        evaluation_config({"gates": {"ldm-contrlnet": {"min_mask_dice_gain": 0.1}}})
    with pytest.raises(ValueError, match="dcgan has no variant 'large'; its variants: none"):
        evaluation_config({"gates": {"dcgan-large": {}}})
    with pytest.raises(ValueError, match="gates.ldm-controlnet: unknown gates"):
        evaluation_config({"gates": {"ldm-controlnet": {"min_mask_dice_gian": 0.1}}})
    # a variant's feature-space thresholds hold for its family's extractor, and only for it
    assert evaluation_config({"gates": {**gates, "ldm-controlnet": {"max_kmmd": 0.3}}})
    with pytest.raises(ValueError, match="gates.ldm-controlnet: a variant's thresholds hold for its family's"):
        evaluation_config({"gates": {**gates, "ldm-controlnet": {"extractor": "pixels-16", "max_kmmd": 0.3}}})
    with pytest.raises(ValueError, match="gates.ldm-controlnet: feature-space gates need the extractor"):
        evaluation_config({"gates": {"ldm": {}, "ldm-controlnet": {"max_kmmd": 0.3}}})
    with pytest.raises(ValueError, match="generator family names have no '-'"):
        register_family(type("HyphenatedGAN", (), {"family": "my-gan"}))
    # names that are no family's variant are sets of their own, as for folders of outside images
    assert gates_for({"real": {"min_confidence": 0.5}, "real-pocus": {"max_kmmd": 0.1}}, "real-pocus") == {
        "max_kmmd": 0.1}


def test_real_holdout_passes_and_memorising_or_noise_generators_fail(lus, tmp_path):
    train, _, _ = split_images(lus, "train")
    holdout, _, _ = split_images(lus, "test")
    real = _folder(tmp_path / "real", train)
    g = torch.Generator().manual_seed(0)
    config = EvaluateConfig(downstream=None)

    def gate(name, images):
        report = evaluate_folders(real, _folder(tmp_path / name, images), pixel_extractor(), PIXEL_GATES, config,
                                  tmp_path / f"report-{name}")
        return report, {row["gate"] for row in report["gates"] if not row["passed"]}

    report, failed = gate("holdout", holdout)
    assert report["passed"] and not failed, report["gates"]
    copies = train[torch.randint(0, len(train), (len(holdout),), generator=g)]
    report, failed = gate("copies", copies)
    assert failed == {"max_near_copy_fraction", "max_pixel_near_copy_fraction"}
    assert report["metrics"]["near_copy_fraction"] == 1.0
    report, failed = gate("noise", torch.rand(len(holdout), 1, 32, 32, generator=g) * 2 - 1)
    assert failed == {"max_kmmd", "max_fid"} and report["metrics"]["one_nn_acc"] == 1.0
    written = json.loads((tmp_path / "report-noise" / "gate_report.json").read_text())
    assert written["passed"] is False and written["extractor"] == "pixels-16@fixed"
    assert "**FAIL**" in (tmp_path / "report-noise" / "gate_report.md").read_text()
    sheet = np.asarray(Image.open(tmp_path / "report-copies" / "closest_pairs.png"))
    assert np.abs(sheet[2:34, 2:34].astype(int) - sheet[36:68, 2:34].astype(int)).max() <= 1  # copy over original


def test_sifid_ratio_passes_variants_of_the_source_and_fails_noise(lus):
    train, _, _ = split_images(lus, "train")
    holdout, _, _ = split_images(lus, "test")
    source, extractor, config = train[:1], pixel_extractor(), EvaluateConfig(downstream=None)
    g = torch.Generator().manual_seed(0)
    variants = (source + 0.05 * torch.randn(8, 1, 32, 32, generator=g)).clamp(-1, 1)
    noise = torch.rand(8, 1, 32, 32, generator=g) * 2 - 1
    gates = {"extractor": "pixels-16", "max_sifid_ratio": 1.0}
    ratios = []
    for images, should_pass in [(variants, True), (noise, False)]:
        metrics, reasons, _ = evaluate_images(images, train, holdout, extractor, config, source)
        passed, [row] = apply_gates(metrics, reasons, gates, extractor)
        assert passed == should_pass and row["extractor"] == extractor.id, row
        assert metrics["sifid_ratio"] == pytest.approx(metrics["sifid"] / metrics["sifid_real"])
        ratios.append(metrics["sifid_ratio"])
    assert ratios[0] < 0.5 < 2 < ratios[1], ratios
    metrics, reasons, _ = evaluate_images(variants, train, None, extractor, config, source)
    assert "sifid" in metrics and "sifid_ratio" not in metrics and "held-out" in reasons["sifid_ratio"]


def test_a_few_image_report_counts_the_samples_nearest_each_source(lus):
    train, _, _ = split_images(lus, "train")
    sources, extractor, config = train[:3], pixel_extractor(), EvaluateConfig(downstream=None)
    noise = 0.05 * torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    samples = (sources[[0, 0, 0, 0, 0, 2, 2, 0]] + noise).clamp(-1, 1)  # none from the second source
    _, _, details = evaluate_images(samples, train, None, extractor, config, sources)
    assert details["samples_nearest_each_source"] == [6, 0, 2]
    _, _, details = evaluate_images(samples, train, None, extractor, config, sources[:1])
    assert "samples_nearest_each_source" not in details  # one source: nothing to share out


def test_scan_iou_passes_samples_that_keep_the_sources_fan_and_fails_shifted_cut_or_dark_ones(lus):
    train, _, _ = split_images(lus, "train")
    holdout, _, _ = split_images(lus, "test")
    source, extractor, config = train[:1], pixel_extractor(), EvaluateConfig(downstream=None)
    kept = (source + 0.05 * torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    pair = source.repeat(2, 1, 1, 1)  # the realism metrics need two samples
    shifted = torch.full_like(pair, -1)
    shifted[..., 10:] = pair[..., :-10]
    cut = pair.clone()
    cut[..., :16] = -1
    dark = torch.full_like(pair, -0.95)
    gates = {"min_scan_iou_to_train": 0.65}
    for images, should_pass in [(kept, True), (shifted, False), (cut, False), (dark, False)]:
        metrics, reasons, _ = evaluate_images(images, train, holdout, extractor, config, source)
        passed, [row] = apply_gates(metrics, reasons, gates, extractor)
        assert passed == should_pass, row
    assert metrics["scan_iou_to_train"] == 0.0
    metrics, _, _ = evaluate_images(kept, train, holdout, extractor, config, source)
    assert metrics["scan_iou_to_train"] > 0.95
    metrics, reasons, _ = evaluate_images(kept, train, holdout, extractor, config, train.repeat(9, 1, 1, 1))
    assert "scan_iou_to_train" not in metrics and "few-image" in reasons["scan_iou_to_train"]


def test_cli_gates_two_folders_and_exits_non_zero_with_check(lus, tmp_path):
    import yaml

    train, _, _ = split_images(lus, "train")
    real = _folder(tmp_path / "real", train)
    noise = _folder(tmp_path / "noise", torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"evaluate": {"downstream": None},
                                                          "gates": {"external": PIXEL_GATES}}))
    args = ["evaluate", "--real", str(real), "--synthetic", str(noise), "--config", str(tmp_path / "params.yaml"),
            "--family", "external", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--check"])
    assert result.exit_code == 2 and "FAILED" in result.output and "max_kmmd" in result.output
    assert CliRunner().invoke(app, args).exit_code == 0
    result = CliRunner().invoke(app, ["evaluate", "--real", str(real)])
    assert result.exit_code == 1 and "--real and --synthetic go together" in result.output
    misspelt = CliRunner().invoke(app, [*args[:-4], "--family", "externl", "--out", str(tmp_path / "out")])
    assert misspelt.exit_code == 1 and "--family externl: no such gate set" in misspelt.output
    assert "its sets: external" in misspelt.output
