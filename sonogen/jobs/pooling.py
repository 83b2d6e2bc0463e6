"""Pooled families trained as parallel tasks: the images a pool's members learn, one member trained apart with
its share of the pool's settings, and the members joined into one model (``Generator.pools``)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from sonogen.data.manifest import image_id
from sonogen.generators import get_generator
from sonogen.generators.trainer import GENERATOR_DIR, training_selection
from sonogen.jobs.training import family_sections, generator_name, load_family_config, register_trained, train_generator
from sonogen.tracking import RunRecord, configure_mlflow, dataset_identity, git_commit, set_experiment


def _pooling(family: str):
    family_class = get_generator(family)
    if family_class.pools is None:
        raise ValueError(f"{family} pools no models trained apart: train it in one job (sonogen train {family})")
    return family_class


def pool_sources(family: str, data: str | Path, label: str, config_path: str | Path | None = None) -> list[str]:
    """The training images (manifest paths) of ``label`` that the members of ``family``'s pool learn, one each,
    chosen as the pool chooses them when it trains in one job."""
    family_class = _pooling(family)
    model_config, _ = load_family_config(config_path, family, label)
    dataset, chosen = training_selection(family_class(model_config), data, label)
    return [dataset.records[k].image for k in chosen]


def train_pool_member(family: str, data: str | Path, label: str, source: str, out: str | Path,
                      config_path: str | Path | None = None, dataset: str | None = None,
                      log: Callable[[str], None] | None = None, monitor: str | None = None) -> dict[str, Any]:
    """Trains the member of ``family``'s pool that learns ``source`` (a manifest path or image id of
    ``pool_sources``) into ``out``: a model of the family the pool pools, with that member's share of the pool's
    settings (``Generator.member_sections``); not registered (``pool_trained`` joins the members)."""
    family_class = _pooling(family)
    sources = pool_sources(family, data, label, config_path)
    matches = [s for s in sources if source in (s, image_id(s))]
    if len(matches) != 1:
        raise ValueError(f"{source!r} is not one of the {len(sources)} images the {family} of {label} learns "
                         f"({', '.join(sources)}): take them from `sonogen pool-members`")
    model, train = family_sections(config_path, family)
    member_model, member_train = family_class.member_sections(model, train, matches[0], len(sources))
    sections = {"train": {family_class.pools: {"model": member_model, "train": member_train}}}
    return train_generator(family_class.pools, data, label, out, sections, dataset, register=False,
                           build_prerequisites=True, log=log, monitor=monitor)


def pool_trained(members: list[str | Path], out: str | Path, register: bool = True,
                 order: list[str] | None = None) -> dict:
    """One model of generators trained apart into ``members`` (e.g. one single-image SinDDM per parallel task),
    made by the family that pools theirs (``Generator.pools``), saved into ``out`` with an MLflow run that names
    the members' runs; registered unless ``register`` is False. With ``order`` (``pool_sources``), the members
    take the places of their images there, as in a pool trained in one job; else the order given."""
    import mlflow

    from sonogen.generators import families, load_generator

    out = Path(out)
    if not members:
        raise ValueError("no models to pool: give the folders of the members trained apart")
    if order is not None:
        place = {RunRecord.read(member).images[0]: member for member in members}
        if len(place) < len(members):
            raise ValueError("two of the models to pool learned the same image: pool each image once")
        if missing := sorted(set(order) ^ set(place)):
            raise ValueError(f"the members learned other images than the pool's: {', '.join(missing)} not in both")
        members = [place[source] for source in order]
    records = [RunRecord.read(member) for member in members]
    for what in ("family", "label", "dataset", "data"):
        if len(values := {getattr(record, what) for record in records}) > 1:
            raise ValueError(f"the models to pool must share their {what}: got {', '.join(sorted(values))}")
    first = records[0]
    pooling = [name for name in families() if get_generator(name).pools == first.family]
    if not pooling:
        raise ValueError(f"no family pools {first.family} models")
    family_class = get_generator(pooling[0])
    pooled = family_class.from_members([load_generator(Path(member) / GENERATOR_DIR) for member in members])
    tracking_uri = configure_mlflow()
    set_experiment(f"{first.dataset}-{family_class.family}")
    with mlflow.start_run(run_name=f"{family_class.family}-{first.label}") as run:
        mlflow.log_params({**dataset_identity(first.data, first.label), "members": len(records)})
        mlflow.set_tags({"family": family_class.family, "label": first.label, "dataset": first.dataset,
                         "code_version": git_commit(), "pooled_runs": ",".join(r.run_id for r in records)})
        pooled.save(out / GENERATOR_DIR)
    record = RunRecord(run.info.run_id, tracking_uri, family_class.family, first.label, first.dataset, first.data,
                       name=generator_name(family_class.family, first.label, asdict(pooled.config)),
                       images=list(pooled.learned_images()), feature_extractor=first.feature_extractor)
    record.write(out)
    info = asdict(record)
    if register:
        info.update(register_trained(out))
    return info
