"""The ``sonogen`` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from sonogen import cli_crossval, cli_data, cli_pipeline, cli_reader, cli_serving
from sonogen.cli_common import console, log, progress as _progress, user_errors as _user_errors

app = typer.Typer(
    help="sonogen: train, gate, register and serve ultrasound image generators.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
registry_app = typer.Typer(help="The MLflow Model Registry: registered generators and their versions.",
                           no_args_is_help=True)
app.add_typer(cli_pipeline.pipeline_app, name="pipeline")
app.add_typer(cli_data.data_app, name="data")
app.add_typer(registry_app, name="registry")
app.add_typer(cli_serving.export_app, name="export")
app.add_typer(cli_reader.reader_app, name="reader-study")
app.command("serve")(cli_serving.serve_command)
app.command("sample")(cli_serving.sample_command)
app.command("generate")(cli_serving.generate_command)
app.command("deploy")(cli_serving.deploy_command)
app.command("crossval")(cli_crossval.crossval_command)
registry_app.command("promote")(cli_serving.promote_command)
registry_app.command("rollback")(cli_serving.rollback_command)
registry_app.command("show")(cli_serving.show_command)


# the flags `train` had per family, kept for one release as aliases of --set
OLD_FLAGS = {"image": "images", "max_images": "max_images", "mode": "mode", "base_model": "base_model",
             "lora_rank": "lora_rank", "control": "control", "condition": "condition", "bank": "bank",
             "size_bias": "size_bias"}


@app.command("train")
@_user_errors
def train_command(
    family: Annotated[str, typer.Argument(help="Generator family, e.g. dcgan.")],
    data: Annotated[str, typer.Option(help="Prepared dataset folder, or its s3:// URI (downloaded first).")],
    label: Annotated[str, typer.Option(help="Label to learn; one generator per label.")],
    config: Annotated[str | None, typer.Option(
        help="YAML with model/train sections, or params.yaml (train.<family>); a path or s3:// URI.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="A model setting of the family's config, KEY=VALUE (YAML value), repeatable; wins over "
                      "--config. An unknown key or a wrong type lists the family's keys (docs/<family>.md).")]
    = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default models/<family>-<label>).")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset name in model names (default: data folder name).")] = None,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment (default <dataset>-<family>).")] = None,
    register: Annotated[bool, typer.Option(help="Register the trained model with alias 'candidate'.")] = True,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint in the output folder.")] = False,
    build_prerequisites: Annotated[bool, typer.Option(
        "--build-prerequisites", help="Train the model the family builds on when none is given (diffultra's "
                                      "ldm), inside the output folder; a lesion bank is always built if missing.")]
    = False,
    monitor: Annotated[str | None, typer.Option(
        help="Feature extractor that reads a GAN's epochs to keep its best (default: the dataset's registered "
             "us-encoder, else pixels-16).")] = None,
    skip_declined: Annotated[bool, typer.Option(
        "--skip-declined", help="For a label the family does not train on, write declined.json and succeed "
                                "(a DVC matrix of families × labels) instead of failing.")] = False,
    upload: Annotated[str | None, typer.Option(
        help="Copy the output folder there when trained (s3:// URI or folder): a Kubeflow TrainJob's model out.")]
    = None,
    member: Annotated[str | None, typer.Option(
        help="For a pooled family (sinddmpool): train only the member that learns this image (one of "
             "`sonogen pool-members`), with its share of the pool's settings; `sonogen pool` joins them.")] = None,
    nproc_per_node: Annotated[int, typer.Option(
        help="Train data-parallel on N local ranks (torchrun: N GPUs, or CPU processes with gloo); "
             "train.batch_size is then the global batch.")] = 1,
    image: Annotated[list[str] | None, typer.Option(hidden=True)] = None,
    max_images: Annotated[int | None, typer.Option(hidden=True)] = None,
    mode: Annotated[str | None, typer.Option(hidden=True)] = None,
    base_model: Annotated[str | None, typer.Option(hidden=True)] = None,
    lora_rank: Annotated[int | None, typer.Option(hidden=True)] = None,
    control: Annotated[str | None, typer.Option(hidden=True)] = None,
    condition: Annotated[str | None, typer.Option(hidden=True)] = None,
    bank: Annotated[str | None, typer.Option(hidden=True)] = None,
    size_bias: Annotated[str | None, typer.Option(hidden=True)] = None,
):
    """Train a generator on one label of a prepared dataset, tracked in MLflow."""
    from sonogen.config import parse_assignments
    from sonogen.generators import distributed
    from sonogen.jobs import generator_name, train_generator

    if nproc_per_node != 1:
        from sonogen.jobs.launch import run_on_local_ranks

        if status := run_on_local_ranks(nproc_per_node, sys.argv[1:]):
            console.print(f"[red]torchrun failed (exit {status}): a rank failed or was killed (see above); "
                          f"--resume continues from the last checkpoint[/red]")
            raise typer.Exit(status)
        return

    overrides = parse_assignments(set_ or [])
    given = {"image": list(image or ()), "max_images": max_images, "mode": mode, "base_model": base_model,
             "lora_rank": lora_rank, "control": control, "condition": condition, "bank": bank, "size_bias": size_bias}
    for flag, value in given.items():
        if value in (None, []):
            continue
        key = OLD_FLAGS[flag]
        shown = f"[{', '.join(map(str, value))}]" if isinstance(value, list) else value
        console.print(f"[yellow]--{flag.replace('_', '-')} is deprecated:[/yellow] write --set {key}={shown}")
        overrides.setdefault(key, value)
    if member is not None and out is None:
        out = Path("models") / f"{family}-{label}-member-{Path(member).stem}"
    out = out or Path("models") / generator_name(family, label, overrides)
    from sonogen.tracking import local_file, local_folder, upload_folder

    data_folder = local_folder(data, "--data")
    dataset = dataset or (data_folder.name if "://" not in data else data.rstrip("/").rsplit("/", 1)[-1])
    config_file = local_file(config, "--config") if config else None
    if member is not None:
        from sonogen.jobs import train_pool_member

        if overrides:
            raise ValueError("--member trains with the pool's settings (--config, train.<family>): move the --set "
                             "values there, so that every member and the pool's choice of images agree")
        info = train_pool_member(family, data_folder, label, member, out, config_file, dataset, monitor=monitor,
                                 log=None if console.is_terminal else log)
        distributed.stop()
        if info.get("rank"):  # under torchrun, rank 0 reports
            return
        console.print(f"trained the {family} member of {member} ({info['family']}, not registered): saved "
                      f"{out / 'generator'}; join the members with `sonogen pool`")
        return
    info = train_generator(family, data_folder, label, out, config_file, dataset, experiment, register, resume,
                           progress=_progress(f"training {family} on {label}"), model_overrides=overrides,
                           log=None if console.is_terminal else log, build_prerequisites=build_prerequisites,
                           skip_declined=skip_declined, monitor=monitor)
    distributed.stop()
    if info.get("rank"):  # under torchrun, rank 0 reports
        return
    if upload:
        upload_folder(out, upload)
        console.print(f"copied {out} to {upload}")
    if "declined" in info:
        console.print(f"not trained: {info['declined']} ({out / 'declined.json'})")
        return
    final = info.get("final", {})
    scores = ", ".join(f"{key} {final[key]:.4g}" for key in ("kmmd", "one_nn_acc", "ssim_to_train", "scan_iou_to_train")
                       if key in final)
    console.print(f"trained {family} on {label}: epoch {final.get('epoch')}, step {final.get('step')}, {scores}")
    if info.get("best"):
        console.print(f"kept {info['best']['reason']}")
    console.print(f"saved {out / 'generator'}, last sample grid {out / 'samples.png'}; "
                  f"MLflow run {info['run_id']} in {info['tracking_uri']}")
    if "version" in info:
        console.print(f"registered [bold]{info['registered_model']}[/bold] version {info['version']} "
                      f"as @{info['alias']}: models:/{info['registered_model']}@{info['alias']}")


@app.command("pool")
@_user_errors
def pool_command(
    members: Annotated[list[Path], typer.Argument(help="Folders of models trained apart (e.g. models/sinddm-*).")],
    out: Annotated[Path, typer.Option(help="Output folder of the pooled model.")],
    register: Annotated[bool, typer.Option(help="Register the pooled model with alias 'candidate'.")] = True,
):
    """Pool models trained apart (one single-image SinDDM per parallel task) into one model (sinddmpool)."""
    from sonogen.jobs import pool_trained

    info = pool_trained(members, out, register)
    console.print(f"pooled {len(members)} models into {info['family']} ({len(info['images'])} images): saved "
                  f"{out / 'generator'}; MLflow run {info['run_id']}")
    if "version" in info:
        console.print(f"registered [bold]{info['registered_model']}[/bold] version {info['version']} "
                      f"as @{info['alias']}: models:/{info['registered_model']}@{info['alias']}")


@app.command("pool-members")
@_user_errors
def pool_members_command(
    family: Annotated[str, typer.Argument(help="A pooled family, e.g. sinddmpool.")],
    data: Annotated[Path, typer.Option(help="Prepared dataset folder.")],
    label: Annotated[str, typer.Option(help="Label the pool learns.")],
    config: Annotated[Path | None, typer.Option(help="params.yaml (train.<family>) or a family YAML.")] = None,
):
    """Print the training images a pooled family's members learn, one per line (each a `train --member` task)."""
    from sonogen.jobs import pool_sources

    for source in pool_sources(family, data, label, config):
        print(source)


@app.command("train-encoder")
@_user_errors
def train_encoder_command(
    data: Annotated[Path, typer.Option(help="Prepared dataset folder; its real training split is used.")],
    out: Annotated[Path, typer.Option(help="Output folder of the classifier.")],
    dataset: Annotated[str | None, typer.Option(help="Dataset name (default: data folder name).")] = None,
    config: Annotated[Path | None, typer.Option(help="params.yaml (evaluate.encoder_epochs, evaluate.device).")]
    = None,
):
    """Train the us-encoder (reduced-VGG classifier on real images) and register it in MLflow."""
    from sonogen.evaluation import train_encoder
    from sonogen.jobs import evaluation_config, read_params

    evaluate_config, _, epochs = evaluation_config(read_params(config))
    info = train_encoder(data, out, dataset or data.name, epochs=epochs, device=evaluate_config.device)
    accuracy = "n/a" if info["val_accuracy"] is None else f"{info['val_accuracy']:.3f}"
    console.print(f"registered [bold]{info['registered_model']}[/bold] version {info['version']} "
                  f"(validation accuracy {accuracy}); saved {out}")


@app.command("evaluate")
@_user_errors
def evaluate_command(
    targets: Annotated[list[str] | None, typer.Argument(help="Trained folders or models:/ URIs.")] = None,
    model: Annotated[list[str] | None, typer.Option(help="A models:/NAME@ALIAS URI or trained folder; repeatable.")]
    = None,
    data: Annotated[Path | None, typer.Option(help="Prepared dataset the generators were trained on.")] = None,
    real: Annotated[Path | None, typer.Option(help="Folder of real images (with --synthetic, no dataset).")] = None,
    synthetic: Annotated[Path | None, typer.Option(help="Folder of generated images to gate.")] = None,
    extractor: Annotated[str | None, typer.Option(
        help="us-encoder (default with --data: the dataset's registered encoder, trained if missing), "
             "us-encoder:<folder|models:/ URI>, pixels-16 (default with --real), inception-v3:<weights>, "
             "resnet34:<weights>.")] = None,
    config: Annotated[Path | None, typer.Option(help="params.yaml with `evaluate` and the `gates` sets.")] = None,
    family: Annotated[str | None, typer.Option(
        help="The gate set of --config that applies to --real/--synthetic folders: a family's or any named set.")]
    = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset name (default: data folder name).")] = None,
    out: Annotated[Path, typer.Option(help="Folder of the gate reports.")] = Path("reports/gates"),
    check: Annotated[bool, typer.Option("--check", help="Exit with code 2 when a generator fails its gates.")]
    = False,
    crossval: Annotated[Path | None, typer.Option(
        help="A `sonogen crossval` report folder (or a folder of them by <family>-<label>): usefulness is gated on "
             "its pooled verdict.")] = None,
):
    """Gate generators: realism, memorisation, diversity, confidence and downstream usefulness."""
    from sonogen.jobs import evaluate_targets, evaluation_config, read_params

    specs = [*(targets or []), *(model or [])]
    if (real is None) != (synthetic is None):
        raise ValueError("--real and --synthetic go together")
    if real is not None:
        from sonogen.evaluation import evaluate_folders
        from sonogen.gates import gates_for
        from sonogen.metrics.features import get_extractor

        evaluate_config, gates, _ = evaluation_config(read_params(config))
        if family and family not in gates and not gates_for(gates, family):
            raise ValueError(f"--family {family}: no such gate set in {config or 'the (absent) --config'}; "
                             f"its sets: {', '.join(gates) or 'none'}")
        report = evaluate_folders(real, synthetic, get_extractor(extractor or "pixels-16"),
                                  gates_for(gates, family) if family else {}, evaluate_config, out)
        results = [{"target": str(synthetic), "report": str(out), **report}]
    elif specs and data is not None:
        results = evaluate_targets(specs, data, extractor, read_params(config), out, dataset, log=log,
                                   crossval=crossval)
    else:
        raise ValueError("give generators (--model or trained folders) with --data, or --real and --synthetic")
    for result in results:
        verdict = "[green]passed[/green]" if result["passed"] else "[red]FAILED[/red]"
        console.print(f"{result['target']}: {verdict} ({result['extractor']}); report {result['report']}/gate_report.md")
        for row in result["gates"]:
            if not row["passed"]:
                console.print(f"  {row['gate']}: {row['value']} vs {row['threshold']} {row['note']}")
    if check and not all(r["passed"] for r in results):
        raise typer.Exit(2)


@app.command("register")
@_user_errors
def register_command(
    trained: Annotated[list[Path], typer.Argument(help="Output folders of `sonogen train`.")],
    alias: Annotated[str, typer.Option(help="Alias given to the new versions.")] = "candidate",
    gates: Annotated[Path | None, typer.Option(
        help="Folder of `sonogen evaluate` reports: only generators that passed are registered.")] = None,
    report: Annotated[Path | None, typer.Option(help="Write the registered versions to this JSON file.")] = None,
    onnx: Annotated[str, typer.Option(
        help="Export each registered GAN to ONNX for the slim serving image: fp32, int8 (CPU serving; fp32 when "
             "its samples fail the int8 gate) or none.")] = "none",
):
    """Register trained generators in the MLflow Model Registry (gated ones only if they passed)."""
    import json

    from sonogen.export import ONNX_CHOICES, export_if_servable_by_onnx
    from sonogen.jobs import register_trained, trained_name
    from sonogen.tracking import declined

    if onnx not in ONNX_CHOICES:
        raise ValueError(f"--onnx must be one of {', '.join(ONNX_CHOICES)}, got {onnx!r}")

    registered = []
    for folder in trained:
        if reason := declined(folder):
            console.print(f"[yellow]nothing to register[/yellow] in {folder}: {reason}")
            continue
        entry = register_trained(folder, alias=alias, gate_report=gates / trained_name(folder) if gates else None)
        registered.append({"folder": str(folder), **entry})
        if entry["registered_model"] is None:
            console.print(f"[yellow]not registered[/yellow] {entry['model_name']}: gates {entry['failed_gates']} "
                          f"failed; the run {entry['run_id']} keeps its report ({entry['report']})")
            continue
        console.print(f"registered [bold]{entry['registered_model']}[/bold] version {entry['version']} as @{alias} "
                      f"(gate {entry['gate']}); last sample grid {folder / 'samples.png'}")
        if exported := export_if_servable_by_onnx(entry["model_uri"], onnx):
            # the artifact's place names its run: the version's onnx_artifact tag keeps it, the report stays reproducible
            registered[-1]["onnx"] = {k: exported[k] for k in ("precision", "int8_refused") if k in exported}
            console.print(f"  exported to ONNX {exported['precision']}: {exported['artifact']}"
                          + (f" (int8 refused: {exported['int8_refused']})" if "int8_refused" in exported else ""))
    if report:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(registered, indent=2) + "\n")


@app.command("convert-weights")
@_user_errors
def convert_weights_command(
    path: Annotated[Path, typer.Argument(help="A pickle weight file (.bin, .pt, .pth, .ckpt) or a model folder.")],
):
    """Convert pickle weights to safetensors, the only format sonogen loads (run it once, on a file you trust)."""
    from sonogen.weights import convert_to_safetensors

    for written in convert_to_safetensors(path):
        console.print(f"wrote {written}")


@registry_app.command("list")
@_user_errors
def registry_list_command():
    """Registered models, versions, aliases and key metrics."""
    from sonogen.registry import list_models
    from sonogen.tracking import configure_mlflow

    rows = list_models()
    uri = configure_mlflow()
    out = Console(soft_wrap=True)
    out.print(f"MLflow Model Registry ({uri})")
    # one narrow table per model, under its name: readable at 80 columns, in a terminal or a log alike
    for name in sorted({row["name"] for row in rows}):
        table = Table(title=name, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("version", "aliases", "gate", "kMMD", "1-NN", "data md5", "code"):
            table.add_column(column, overflow="fold")
        for row in (row for row in rows if row["name"] == name):
            tags = row["tags"]
            table.add_row(row["version"], " ".join("@" + a for a in row["aliases"]), tags.get("gate", ""),
                          _short(tags.get("gate.kmmd", tags.get("metric.kmmd", ""))),
                          _short(tags.get("gate.one_nn_acc", tags.get("metric.one_nn_acc", ""))),
                          _short_hash(tags.get("data_dvc_md5", "")), _short_hash(tags.get("code_version", "")))
        out.print(table)
    if not rows:
        console.print("no registered models yet: run `make run` or `sonogen train ...`")
    elif uri.startswith("sqlite:///"):
        console.print(f"browse runs, curves and sample grids: mlflow ui --backend-store-uri {uri}")
        console.print("in Python: sonogen.registry.load_registered_generator('models:/NAME@ALIAS')")


def _short_hash(value: str) -> str:
    """A digest's first 8 characters (a commit keeps its ``-dirty``); other values (``untracked``) whole."""
    digest, dash, rest = value.partition("-")
    if digest and all(c in "0123456789abcdef" for c in digest):
        return digest[:8] + dash + rest[:5]
    return value


def _short(value: str) -> str:
    """A metric tag in 3 significant digits."""
    try:
        return f"{float(value):.3g}"
    except ValueError:
        return value


if __name__ == "__main__":  # torchrun runs `python -m sonogen.cli -- ARGS`; some Pythons keep its `--`
    if sys.argv[1:2] == ["--"]:
        del sys.argv[1]
    app()
