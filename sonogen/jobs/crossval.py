"""The cross-validation steps: one fold (train the generator on the other folds' patients, gate it, test the
downstream classifiers on the fold's patients) and the pooled verdict; ``crossval`` runs them all here."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Callable

from sonogen.crossval import assign_folds, fold_view, patient_labels, pool, verdict_line, write_report
from sonogen.data.manifest import MANIFEST, file_sha256, read_manifest
from sonogen.evaluation import evaluate_generator, train_encoder
from sonogen.gates import gates_for
from sonogen.generators import get_generator, load_generator
from sonogen.generators.base import CHECKPOINT
from sonogen.generators.trainer import GENERATOR_DIR, resolve_device
from sonogen.jobs.data import read_params
from sonogen.jobs.gating import evaluation_config
from sonogen.jobs.training import train_generator
from sonogen.metrics.downstream import AUGMENTED, BASELINE
from sonogen.metrics.features import get_extractor
from sonogen.metrics.protocols import METRICS
from sonogen.tracking import configure_mlflow, dataset_identity, git_commit, set_experiment

FOLD_RESULT = "fold_result.json"
SETTINGS = "crossval_settings.json"  # what a resumed run must share with the run it finishes
# which MLflow run holds the cross-validation, from which commit: a pointer into the store, a new one every run,
# so kept apart from the outputs' content (.dvcignore leaves it out of their hashes)
RUN_POINTER = "crossval_run.json"
# params.yaml sections that decide nothing inside a fold (the data's making is in its manifest's digest), and the
# lists that only choose which runs a matrix makes
NOT_FOLD_SETTINGS = ("dataset", "phantom", "prepare", "register", "train.families", "train.labels",
                     "crossval.families", "crossval.labels")
# what a fold's generator never reads: ``--models-from`` reuses generators across changes of these
EVALUATION_SETTINGS = ("evaluate", "gates")
PER_FOLD = "us-encoder, one per fold on its training patients"
# judged on the pooled verdict, not on one fold's few patients
POOLED_GATES = ("min_auc_delta_lower_ci", "min_balanced_accuracy_delta_lower_ci", "min_detection_ap50_delta",
                "min_detection_ap50_delta_lower_ci", "min_seg_dice_delta", "min_seg_dice_delta_lower_ci")


def crossval_extractor(spec: str | None = None) -> str | None:
    """The feature extractor of the folds' gates and kept-epoch readings: a ``spec`` naming one is shared by every
    fold; by default (None or ``us-encoder``) None: each fold trains its own us-encoder on its training patients,
    so not even the measuring device has seen the patients a fold is tested on."""
    return None if spec in (None, "us-encoder") else spec


def crossval_fold(family: str, data: str | Path, label: str, fold: int, folds: int, out: str | Path,
                  config_path: str | Path, extractor_spec: str | None, dataset: str | None = None, seed: int = 0,
                  parent_run_id: str | None = None, log: Callable[[str], None] | None = None,
                  view: str | Path | None = None, protocol: str | None = None, resume: bool = False,
                  trained: str | Path | None = None, trained_on: list[str] | None = None) -> dict:
    """Fold ``fold`` of ``folds``: the generator trained on the other folds' patients, gated on the fold's view
    of the data (written to ``view``, default ``out/data``), the downstream classifiers tested on the fold's
    patients; its result in ``out/fold_result.json``. ``extractor_spec`` None: the fold's own us-encoder, trained
    on its training patients (``out/encoder``). ``protocol`` names the downstream protocol in place of
    params.yaml's ``evaluate.downstream.protocol``. ``resume``: a generator whose training left a checkpoint in
    ``out`` continues from it (``crossval`` checks that the settings are the same). ``trained``: a model trained
    apart on this fold's view (``crossval_fold_data``), gated and tested in place of one trained here;
    ``trained_on``: the patients it learned from, refused unless they are this fold's generator patients."""
    data, out = Path(data), Path(out)
    say = (lambda message: log(f"fold {fold}: {message}")) if log else None
    params = read_params(config_path)
    config, gates, encoder_epochs = evaluation_config(params)
    if config.downstream is None:
        raise ValueError("cross-validation measures usefulness: params.yaml's evaluate.downstream is switched off")
    if protocol:
        config = replace(config, downstream=replace(config.downstream, protocol=protocol))
        config.downstream.__post_init__()
    if config.downstream.resolved.detection and not get_generator(family).places_lesions:
        raise ValueError(f"protocol {config.downstream.protocol} measures lesion detection, and {family} does not "
                         "place lesions: use --protocol default (or yu2023) for it")
    if config.downstream.resolved.segmentation and not get_generator(family).draws_masks:
        raise ValueError(f"protocol {config.downstream.protocol} measures lesion segmentation, and {family} draws "
                         "no masks: use --protocol default (or yu2023) for it")
    records = read_manifest(data)
    other = sorted({r.label for r in records} - {label}) if (params.get("crossval") or {}).get("synthetic_only") else []
    if len(other) > 1:  # the arm of synthetic images only draws the other label too
        raise ValueError(f"crossval.synthetic_only draws the other label's images too, and {data} has {len(other)} "
                         f"other labels ({', '.join(other)}): it needs a two-label dataset")
    fold_of, validation = _fold_split(records, fold, folds, seed, config)
    train_patients = sorted(p for p, f in fold_of.items() if f not in (fold, validation))
    if trained_on is not None and sorted(trained_on) != train_patients:
        raise ValueError(
            f"fold {fold}: the model in {trained} learned from {len(set(trained_on) ^ set(train_patients))} patients "
            f"other than this fold's generator would (protocol {config.downstream.protocol}"
            f"{' keeps validation patients apart' if validation is not None else ' keeps no validation patients'}): "
            "test it under the protocol it was trained for, or train the generators again (without --models-from)")
    view = fold_view(data, fold_of, fold, view or out / "data", validation)
    if extractor_spec is None:
        if say:
            say("us-encoder on the fold's training patients")
        encoder = train_encoder(view, out / "encoder", dataset or data.name, encoder_epochs, device=config.device)
        extractor_spec = f"us-encoder:{encoder['folder']}"
    if say:
        say(f"testing the {family} trained apart on {len(train_patients)} patients" if trained
            else f"training {family} on {len(train_patients)} patients")

    def train_one(target: str, folder: Path) -> None:
        resumed = resume and (folder / CHECKPOINT).is_file()
        if resumed and say:
            say(f"continuing the training of {family} on {target} from its checkpoint")
        train_generator(family, view, target, folder, config_path, dataset or data.name, register=False,
                        build_prerequisites=True, parent_run_id=parent_run_id, log=say, monitor=extractor_spec,
                        resume=resumed)

    if trained is not None:  # trained apart on this fold's view (a pooled family's members, one task each)
        shutil.copytree(trained, out / "model", dirs_exist_ok=True)
    else:
        train_one(label, out / "model")
    generator = load_generator(out / "model" / GENERATOR_DIR, resolve_device(config.device))
    negative = None
    if other:
        if say:
            say(f"training {family} on {other[0]} too, for the classifiers of synthetic images only")
        train_one(other[0], out / "negative")
        negative = load_generator(out / "negative" / GENERATOR_DIR, resolve_device(config.device))
    fold_gates = {k: v for k, v in gates_for(gates, generator.gate_set).items() if k not in POOLED_GATES}
    report = evaluate_generator(generator, view, get_extractor(extractor_spec), fold_gates, config, out / "gates",
                                f"{family}-{label} fold {fold}", negative, log=say,
                                data_name=f"{data}, fold {fold} of {folds}", pooled_later=True)
    downstream = report.get("downstream", {})
    result = {
        "fold": fold,
        "generator_train_patients": train_patients,
        "validation_patients": sorted(p for p, f in fold_of.items() if f == validation),
        "test_patients": sorted(p for p, f in fold_of.items() if f == fold),
        "gates": report["gates"], "passed": report["passed"], "metrics": report["metrics"],
        "protocol": config.downstream.protocol, "extractor": extractor_spec,
    }
    if "probabilities" in downstream:
        result.update(protocol=downstream["protocol"], metric=downstream["metric"], classes=downstream["classes"],
                      positive=downstream["classes"].index(downstream["label_class"]),
                      per_seed={m: downstream[f"{m}_per_seed"] for m in METRICS if f"{m}_per_seed" in downstream},
                      probabilities=downstream["probabilities"], class_targets=downstream["class_targets"],
                      targets=downstream["targets"], image_patients=downstream["patients"],
                      selection=downstream["selection"])
    else:
        result["downstream_error"] = downstream.get("error", report["not_measured"].get("auc_delta", "not run"))
    if "not_measured" in downstream:
        result["downstream_note"] = downstream["not_measured"]
    if kept := report.get("detection_predictions"):
        arms = {"real": BASELINE, f"real+{family}": AUGMENTED}  # named as the classifiers' arms
        result["detection"] = {"predictions": {arms[arm]: runs for arm, runs in kept["predictions"].items()},
                               "truths": kept["truths"], "image_patients": kept["patients"]}
        result.setdefault("per_seed", {})["ap50"] = {arms[arm]: values["ap50"]["values"]
                                                     for arm, values in report["detection"].items()}
    if segmentation := report.get("segmentation"):
        result["segmentation"] = {"dice": segmentation["dice_per_image"], "image_patients": segmentation["patients"]}
        result.setdefault("per_seed", {})["seg_dice"] = segmentation["seg_dice_per_seed"]
    (out / FOLD_RESULT).write_text(json.dumps(result) + "\n")
    return result


def _fold_split(records, fold: int, folds: int, seed: int, config) -> tuple[dict[str, int], int | None]:
    """Each patient's fold, and the fold whose patients are fold ``fold``'s validation patients (if any)."""
    fold_of = assign_folds(patient_labels(records), folds, seed)
    # a protocol that chooses on validation patients gets the next fold's as validation, unseen by the generator
    return fold_of, (fold + 1) % folds if config.downstream.resolved.needs_validation else None


def crossval_fold_data(data: str | Path, fold: int, folds: int, view: str | Path, encoder: str | Path,
                       config_path: str | Path, dataset: str | None = None, seed: int = 0) -> dict:
    """Fold ``fold``'s view of ``data`` as a dataset of its own in ``view`` (images copied: tasks on other nodes
    read it) and the fold's us-encoder, trained on its training patients, in ``encoder``: what the tasks that train
    a pooled family's members on the fold share, before ``crossval_fold(..., trained=...)`` tests their pool."""
    data = Path(data)
    config, _, encoder_epochs = evaluation_config(read_params(config_path))
    fold_of, validation = _fold_split(read_manifest(data), fold, folds, seed, config)
    fold_view(data, fold_of, fold, view, validation, link=False)
    info = train_encoder(view, encoder, dataset or data.name, encoder_epochs, device=config.device)
    return {"view": str(view), "encoder": info["folder"],
            "test_patients": sorted(p for p, f in fold_of.items() if f == fold)}


def crossval_report(results: list[dict], out: str | Path, family: str, label: str, data: str | Path,
                    config_path: str | Path, dataset: str, seed: int = 0, extractor: str = "",
                    run_id: str | None = None, fold_runs: list[str] = ()) -> dict:
    """The pooled verdict of the folds' results, written to ``out`` (``crossval_report.json``, ``.md``, plots) and
    logged to the cross-validation's MLflow run (``run_id``, or a new one naming the folds' generator runs)."""
    config, _, _ = evaluation_config(read_params(config_path))
    report = pool(results, config.downstream.bootstrap, config.seed)
    report.update(family=family, label=label, data=str(data), seed=seed, extractor=extractor)
    write_report(report, out)
    client = _client()
    run_id = run_id or _start_run(client, family, label, data, dataset, len(results), seed, extractor)
    if fold_runs:
        client.set_tag(run_id, "crossval.fold_runs", ",".join(fold_runs))
    pooled = report["pooled"]
    for key in ("real", "real_plus_synthetic", "delta", "ci_low", "ci_high", "detectable_delta"):
        if key in pooled:
            client.log_metric(run_id, f"crossval.{key}", pooled[key])
    client.set_tag(run_id, "crossval.verdict", pooled["verdict"])
    client.set_tag(run_id, "crossval.metric", pooled.get("metric", "auc"))
    for name in ("crossval_report.json", "crossval_report.md", "fold_auc.png", "pooled_roc.png"):
        if (Path(out) / name).is_file():
            client.log_artifact(run_id, str(Path(out) / name), "crossval")
    client.set_terminated(run_id, "FINISHED")
    return {**report, "run_id": run_id, "report": str(out)}


def _client():
    import mlflow

    configure_mlflow()
    return mlflow.MlflowClient()


def _start_run(client, family: str, label: str, data: Path | str, dataset: str, folds: int, seed: int,
               extractor: str) -> str:
    """The cross-validation's MLflow run, in the family's experiment (its folds' generator runs are there too)."""
    experiment = set_experiment(f"{dataset}-{family}").experiment_id
    run = client.create_run(experiment, run_name=f"crossval-{family}-{label}", tags={
        "family": family, "label": label, "dataset": dataset, "code_version": git_commit(), "crossval": "true"})
    for key, value in {**dataset_identity(data, label), "folds": folds, "seed": seed, "extractor": extractor}.items():
        client.log_param(run.info.run_id, key, value)
    return run.info.run_id


def fold_settings(family: str, data: str | Path, label: str, folds: int, seed: int, extractor: str | None,
                  protocol: str | None, config_path: str | Path) -> dict:
    """What decides a fold's result: the run's arguments, the data's manifest and a digest of each params.yaml
    section a fold reads (``train`` and ``crossval`` per key), so a changed one can be named."""
    sections: dict[str, str] = {}
    for key, value in read_params(config_path).items():
        parts = value.items() if key in ("train", "crossval") and isinstance(value, dict) else [(None, value)]
        for part, part_value in parts:
            name = f"{key}.{part}" if part else key
            if name not in NOT_FOLD_SETTINGS and key not in NOT_FOLD_SETTINGS:
                sections[name] = hashlib.sha256(json.dumps(part_value, sort_keys=True).encode()).hexdigest()[:16]
    return {"family": family, "label": label, "folds": folds, "seed": seed, "extractor": extractor or PER_FOLD,
            "protocol": protocol, "data_manifest_sha256": file_sha256(Path(data) / MANIFEST), "params": sections}


def _changed(then: dict, now: dict) -> list[str]:
    changed = [f"{key} ({then.get(key)} then, {now[key]} now)" for key in now
               if key != "params" and then.get(key) != now[key]]
    before, after = then.get("params", {}), now["params"]
    return changed + [f"params.yaml's {key}" for key in sorted(set(before) | set(after))
                      if before.get(key) != after.get(key)]


def _earlier_run(out: Path, settings: dict, log: Callable[[str], None] | None) -> dict | None:
    """The unfinished run in ``out`` that ``--resume`` finishes, None if there is none; refused if its settings
    differ from ``settings``."""
    if not (out / SETTINGS).is_file():
        if log:
            log(f"nothing to resume in {out}: starting the cross-validation")
        return None
    earlier = json.loads((out / SETTINGS).read_text())
    if changed := _changed(earlier, settings):
        raise ValueError(f"--resume: {out} holds a cross-validation run with other settings: {'; '.join(changed)}. "
                         f"Resume it with the settings it ran with, or run without --resume (or into another --out)")
    return earlier


def _models_source(source: Path, out: Path, settings: dict) -> str | None:
    """The MLflow run id (if known) of the earlier cross-validation in ``source`` whose generators ``--models-from``
    tests again; refused unless they learned as this run's would: family, label, folds, seed, data, and every
    params.yaml section but the evaluation's and other families' training."""
    if source.resolve() == out.resolve():
        raise ValueError(f"--models-from {source} is this run's --out, whose folds a new run replaces: give the new "
                         "run another --out")
    if not (source / SETTINGS).is_file():
        raise ValueError(f"--models-from: {source} holds no cross-validation ({SETTINGS} is missing): name the --out "
                         "of a finished `sonogen crossval`")
    then = json.loads((source / SETTINGS).read_text())

    def training(of: dict) -> dict:
        return {**{key: of.get(key) for key in ("family", "label", "folds", "seed", "data_manifest_sha256")},
                "params": {key: value for key, value in of.get("params", {}).items()
                           if key not in EVALUATION_SETTINGS and not key.startswith("crossval.")
                           and not (key.startswith("train.") and key != f"train.{settings['family']}")}}

    if changed := _changed(training(then), training(settings)):
        raise ValueError(f"--models-from: {source}'s generators were trained otherwise: {'; '.join(changed)}. Test "
                         "them with the settings they were trained with, or train again (without --models-from)")
    pointer = source / RUN_POINTER  # runs before the pointer file kept the run id in their settings
    return json.loads(pointer.read_text())["run_id"] if pointer.is_file() else then.get("run_id")


def _fold_models(source: Path, fold: int) -> dict:
    """``crossval_fold``'s arguments that test fold ``fold``'s generator of the cross-validation in ``source``."""
    finished, model = source / f"fold-{fold}" / FOLD_RESULT, source / f"fold-{fold}" / "model"
    if not finished.is_file() or not (model / GENERATOR_DIR).is_dir():
        raise ValueError(f"--models-from: fold {fold} of {source} did not finish (no {FOLD_RESULT} or saved model): "
                         "finish that run first (`sonogen crossval ... --resume`)")
    return {"trained": model, "trained_on": json.loads(finished.read_text())["generator_train_patients"]}


def crossval(family: str, data: str | Path, label: str, folds: int, out: str | Path, config_path: str | Path,
             dataset: str | None = None, seed: int = 0, extractor: str | None = None,
             log: Callable[[str], None] | None = None, protocol: str | None = None, resume: bool = False,
             models_from: str | Path | None = None) -> dict:
    """All folds, then the pooled report in ``out``; one MLflow run with a child run per fold's generator.

    ``resume`` finishes an interrupted run in ``out``, in its MLflow run: finished folds are kept, an unfinished
    fold's training continues from its checkpoint; refused if the settings differ. Without it, an earlier run's
    folds in ``out`` are replaced. ``models_from``: an earlier cross-validation whose fold generators are tested
    again instead of trained again (when only the evaluation changed); refused unless trained as this run would."""
    data, out = Path(data), Path(out)
    dataset = dataset or data.name
    extractor_spec = crossval_extractor(extractor)
    described = extractor_spec or PER_FOLD
    settings = fold_settings(family, data, label, folds, seed, extractor_spec, protocol, config_path)
    source_run = _models_source(Path(models_from), out, settings) if models_from else None
    settings["models_from"] = str(models_from) if models_from else None
    earlier = _earlier_run(out, settings, log) if resume else None
    if not earlier:
        for folder in out.glob("fold-*"):  # an earlier run's folds: never to be mixed into this one's
            if folder.is_dir():
                shutil.rmtree(folder)
    client, commit = _client(), git_commit()
    # the interrupted run continues in its MLflow run (outputs fetched by `dvc pull` come without the pointer)
    pointer = json.loads((out / RUN_POINTER).read_text()) if earlier and (out / RUN_POINTER).is_file() else None
    if pointer:
        run_id = pointer["run_id"]
        client.update_run(run_id, status="RUNNING")
        if pointer["code_version"] != commit:
            client.set_tag(run_id, "crossval.resumed_code_version", commit)
    else:
        run_id = _start_run(client, family, label, data, dataset, folds, seed, described)
    if models_from:
        client.set_tag(run_id, "crossval.models_from", str(models_from))
    if source_run:
        client.set_tag(run_id, "crossval.models_from_run", source_run)
    out.mkdir(parents=True, exist_ok=True)
    (out / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
    (out / RUN_POINTER).write_text(json.dumps({"run_id": run_id, "code_version": commit}, indent=2) + "\n")
    try:
        results, kept = [], []
        with tempfile.TemporaryDirectory(prefix="sonogen-folds-") as views:  # links to the data: not outputs
            for fold in range(folds):
                finished = out / f"fold-{fold}" / FOLD_RESULT
                if earlier and finished.is_file():
                    results.append(json.loads(finished.read_text()))
                    kept.append(str(fold))
                    if log:
                        log(f"fold {fold}: finished earlier, kept")
                    continue
                reused = _fold_models(Path(models_from), fold) if models_from else {}
                results.append(crossval_fold(family, data, label, fold, folds, out / f"fold-{fold}", config_path,
                                             extractor_spec, dataset, seed, run_id, log, Path(views) / f"fold-{fold}",
                                             protocol, resume=earlier is not None, **reused))
        if kept:
            client.set_tag(run_id, "crossval.kept_folds", ",".join(kept))
        report = crossval_report(results, out, family, label, data, config_path, dataset, seed, described, run_id)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    if log:
        log(f"{family}-{label}: {verdict_line(report['pooled'])}")
    return report
