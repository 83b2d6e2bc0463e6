"""The ``sonogen`` commands that export, serve, sample and promote registered generators."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from sonogen.cli_common import console, progress, user_errors
from sonogen.export import MAX_MMD_RATIO, PARITY_TOLERANCE

export_app = typer.Typer(help="Export registered generators for serving.", no_args_is_help=True)

Token = Annotated[str | None, typer.Option(envvar="SONOGEN_SERVE_TOKEN", help="Bearer token of the endpoint.")]
ChannelsLast = Annotated[bool, typer.Option(
    "--channels-last", help="A torch family's networks in NHWC memory order (the same images, faster convolutions).")]
Compile = Annotated[bool, typer.Option(
    "--compile", help="A torch family's networks compiled (torch.compile, at the first draw of each batch shape; "
                      "the same images, to rounding).")]


@export_app.command("onnx")
@user_errors
def export_onnx_command(
    model: Annotated[str, typer.Argument(help="models:/NAME@ALIAS or models:/NAME/VERSION.")],
    precision: Annotated[str, typer.Option(help="fp32, or int8: quantised, for ONNX Runtime on CPUs.")] = "fp32",
    tolerance: Annotated[float, typer.Option(
        help="fp32: largest ONNX Runtime vs torch difference accepted.")] = PARITY_TOLERANCE,
    max_mmd_ratio: Annotated[float, typer.Option(
        help="int8: largest kernel MMD of its samples to torch's, as a share of two torch draws'.")] = MAX_MMD_RATIO,
):
    """Export a GAN generator to ONNX, check it against torch, and log it to the same model version."""
    from sonogen.export import export_registered

    result = export_registered(model, tolerance, precision, max_mmd_ratio)
    if precision == "int8":
        agreement = (f"samples' kernel MMD to torch's {result['mmd_ratio']:.2g} of two torch draws' "
                     f"(≤ {max_mmd_ratio:g}), max pixel difference {result['max_grey_diff']} grey levels "
                     f"(mean {result['mean_grey_diff']:.2f})")
    else:
        agreement = f"max |ONNX − torch| = {result['max_abs_diff']:.2g} (≤ {tolerance:g})"
    console.print(f"{result['model_name']} v{result['version']}: ONNX {precision}, opset {result['opset']}, "
                  f"{result['bytes'] / 1e6:.1f} MB, {agreement}; logged as {result['artifact']}")


@user_errors
def serve_command(
    model: Annotated[str, typer.Option(help="Registered model name (or a models:/ URI, or a saved generator folder).")],
    alias: Annotated[str, typer.Option(help="Alias to serve.")] = "champion",
    version: Annotated[str | None, typer.Option(help="Serve this version instead of the alias.")] = None,
    host: Annotated[str, typer.Option(help="Interface to bind; loopback unless you mean to share it.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8080,
    max_n: Annotated[int, typer.Option(min=1, help="Most images one call may ask for.")] = 256,
    max_batch: Annotated[int | None, typer.Option(min=1, help="Most images per network call (requests are batched; "
                                                        "default: 16 on a CPU, more on a GPU by family).")] = None,
    max_body_bytes: Annotated[int, typer.Option(min=1024, help="Largest request body accepted.")] = 64 * 1024,
    precision: Annotated[str | None, typer.Option(
        help="What requests that name no precision sample at: fp32 or bf16 (torch families; an ONNX export "
             "samples at its own). Default fp32.")] = None,
    channels_last: ChannelsLast = False,
    compile_: Compile = False,
    token: Token = None,
    watch: Annotated[float, typer.Option(help="Poll the alias every this many seconds and reload on promotion "
                                                "(0: load once).")] = 0,
):
    """Serve a registered generator with KServe's v1 and v2 protocols on this machine."""
    from serving.app import model_uri, run_server, watch_alias
    from serving.predictor import SamplerModel
    from sonogen.registry import model_name_of

    uri = model_uri(model, alias, version)
    sampler = SamplerModel(model_name_of(uri), uri, max_n=max_n, max_batch=max_batch, precision=precision,
                           channels_last=channels_last, compile=compile_)
    if not sampler.load():
        if not watch:
            raise ValueError(f"{uri} does not exist in the registry; promote a version first or pass --watch")
        console.print(f"{uri} does not exist yet: answering 503 until it does (polling every {watch:g} s)")
    if watch:
        watch_alias(sampler, watch)
    if sampler.ready:
        console.print(f"serving {sampler.name} version {sampler.version} ({sampler.backend.runtime}, "
                      f"{sampler.backend.precision})")
    console.print(f"v1: POST http://{host}:{port}/v1/models/{sampler.name}:predict   "
                  f"v2: POST http://{host}:{port}/v2/models/{sampler.name}/infer")
    run_server(sampler, host, port, max_body_bytes=max_body_bytes, token=token)


@user_errors
def sample_command(
    url: Annotated[str, typer.Option(help="Endpoint, e.g. http://127.0.0.1:8080.")],
    model: Annotated[str, typer.Option(help="Served model name.")],
    out: Annotated[Path, typer.Option(help="Folder for the PNGs and manifest.csv.")],
    n: Annotated[int, typer.Option("-n", "--n", min=1, help="Number of images.")] = 16,
    seed: Annotated[int, typer.Option(min=0, help="Seed; the same seed and version give the same images.")] = 0,
    label: Annotated[str | None, typer.Option(help="Label to ask for (checked by the server).")] = None,
    condition: Annotated[str | None, typer.Option(help="Condition as JSON, for families that take one.")] = None,
    per_request: Annotated[int, typer.Option(min=1, help="Images per request.")] = 16,
    precision: Annotated[str | None, typer.Option(
        help="fp32 or bf16 instead of the server's default (torch families).")] = None,
    token: Token = None,
):
    """Ask a sampling endpoint for images and save them with a manifest."""
    from sonogen.client import sample, save_samples

    images = sample(url, model, n, seed, label=label, condition=json.loads(condition) if condition else None,
                    token=token, per_request=per_request, precision=precision)
    manifest = save_samples(images, out)
    console.print(f"wrote {len(images)} images of {model} v{images[0]['model_version']} to {out}/ ({manifest.name})")


@user_errors
def generate_command(
    model: Annotated[str, typer.Option(help="models:/NAME@ALIAS or models:/NAME/VERSION.")],
    n: Annotated[int, typer.Option("-n", "--n", min=1, help="Number of images.")],
    out: Annotated[str, typer.Option(help="Output folder or s3://bucket/prefix.")],
    seed: Annotated[int, typer.Option(min=0, help="Seed of the whole set.")] = 0,
    batch: Annotated[int, typer.Option(min=1, help="Images per chunk (the unit of resumption).")] = 64,
    condition: Annotated[str, typer.Option(help='What every image is drawn with, as JSON: {"label": "normal"}, '
                                                '{"size_bias": "large"}, {"size": [96, 128]} (the family\'s keys).')]
    = "{}",
    condition_folder: Annotated[str | None, typer.Option(
        help="KEY=FOLDER: each image drawn with its own PNG of FOLDER as that condition (a ControlNet's mask, "
             "DiffUltra's background image); masks are copied beside the images as the manifest's mask column.")]
    = None,
    shards: Annotated[int, typer.Option(min=1, help="Workers sharing the set (each runs with its --shard).")] = 1,
    shard: Annotated[int, typer.Option(min=0, help="This worker's part, 0 … --shards − 1.")] = 0,
    merge: Annotated[bool, typer.Option("--merge", help="Join the --shards workers' parts into manifest.csv.")]
    = False,
    precision: Annotated[str | None, typer.Option(
        help="fp32, or bf16 for torch families (within a few grey levels of fp32; part of the set's settings). "
             "Default: fp32, or an ONNX export's own.")] = None,
    channels_last: ChannelsLast = False,
    compile_: Compile = False,
):
    """Write a large synthetic dataset (images + manifest.csv); rerun the same command to resume. With --shards K,
    K workers (--shard 0 … K−1) draw disjoint parts of the same set, then one --merge writes its manifest."""
    from sonogen.generate import condition_folder_of, condition_of, generate_dataset, merge_shards

    if merge:
        result = merge_shards(out, shards)
        console.print(f"merged {shards} shards: {result['images']} images of {result['model_name']} "
                      f"v{result['model_version']} in {out}; manifest.csv")
        return
    result = generate_dataset(model, n, out, seed=seed, batch=batch, condition=condition_of(condition), shards=shards,
                              shard=shard, progress=progress(f"generating {n} images"),
                              per_image=condition_folder_of(condition_folder), precision=precision,
                              channels_last=channels_last, compile=compile_)
    part = "" if shards == 1 else f"shard {shard} of {shards}: "
    console.print(f"{part}{result['images']} images of {result['model_name']} v{result['model_version']} in {out} "
                  f"({result['skipped_chunks']} of {result['chunks']} chunks were already there); "
                  + ("manifest.csv" if shards == 1 else f"then merge: sonogen generate … --shards {shards} --merge"))


@user_errors
def promote_command(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version to promote.")],
    to: Annotated[str, typer.Option(help="Alias to move.")] = "champion",
    reason: Annotated[str, typer.Option(help="Why (recorded on the version; required with --force).")] = "",
    force: Annotated[bool, typer.Option("--force", help="Promote a version whose gates did not pass.")] = False,
):
    """Point an alias (champion) at a version whose gates passed; the previous holder is remembered."""
    from sonogen.registry import promote

    result = promote(name, version, to, reason, force)
    previous = f" (was version {result['previous_version']})" if result["previous_version"] else ""
    console.print(f"{name}@{to} → version {version}{previous}, gate {result['gate']}, by {result['by']}")


@user_errors
def rollback_command(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    alias: Annotated[str, typer.Option(help="Alias to return to its previous holder.")] = "champion",
):
    """Return an alias to the version that held it before the last promotion."""
    from sonogen.registry import rollback

    result = rollback(name, alias)
    console.print(f"{name}@{alias} → version {result['version']} (was version {result['from_version']})")


@user_errors
def show_command(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str | None, typer.Option(help="Version (default: the champion, else the latest).")] = None,
):
    """Print a version's model card (Markdown): data, licences, training config, gates, intended use, limitations."""
    from sonogen.registry import model_card

    typer.echo(model_card(name, version))


@user_errors
def deploy_command(
    model: Annotated[str, typer.Argument(help="Registered model name (or models:/NAME@ALIAS).")],
    alias: Annotated[str, typer.Option(help="The alias the predictor serves and follows.")] = "champion",
    out: Annotated[Path | None, typer.Option(help="Folder of the kustomization (default deploy/<name>).")] = None,
    device: Annotated[str, typer.Option(help="gpu (one nvidia.com/gpu per replica) or cpu.")] = "gpu",
    node_selector: Annotated[list[str] | None, typer.Option(
        help="KEY=VALUE a serving node must carry (e.g. nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3); repeatable.")]
    = None,
    min_replicas: Annotated[int, typer.Option(min=1, help="Warm replicas (one watches the alias).")] = 1,
    max_replicas: Annotated[int, typer.Option(min=1, help="Most replicas KServe scales to.")] = 2,
    precision: Annotated[str | None, typer.Option(
        help="What requests that name none sample at: fp32 or bf16 (torch-served families).")] = None,
):
    """Write the KServe InferenceService of a registered model (the image, GPU, probes, timeout and autoscaling its
    family needs) as a kustomization: kubectl apply -k deploy/<name>."""
    from sonogen.deploy import deploy
    from sonogen.registry import model_name_of

    selector = {}
    for pair in node_selector or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--node-selector takes KEY=VALUE, got {pair!r}")
        selector[key] = value
    result = deploy(model, out or Path("deploy") / model_name_of(model), alias, device, selector, min_replicas,
                    max_replicas, precision)
    console.print(f"{result['name']}@{result['alias']} (version {result['version']}, {result['family']}, "
                  f"{result['runtime']}) on {result['device']}: {result['image']}")
    console.print(f"apply with: kubectl apply -k {result['out']}")
