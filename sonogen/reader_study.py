"""Reader studies: can clinicians tell a registered generator's images from real ones?

A study folder holds what readers see, ``images/<id>.png`` (ids drawn at random: nothing in a name, a file or the
order says where an image came from) and ``study.json`` (the model version, the image ids, the questions), and
apart from it ``private/`` (``key.json``: which image is real; ``readers.json``: each reader's token), which the
study's web page never serves. Answers go to ``answers/<reader>.jsonl``, one line per answer, on disk before the
reader sees the next image. The report scores each reader and all of them pooled.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from sonogen.data.manifest import load_grey, read_manifest
from sonogen.sampling import png_bytes

STUDY, PRIVATE, KEY, READERS, ANSWERS = "study.json", "private", "key.json", "readers.json", "answers"
REAL, SYNTHETIC = "real", "synthetic"
REPORT_MD, REPORT_PNG = "reader_study.md", "reader_study.png"


def create_study(model_uri: str, real: str | Path, n: int, out: str | Path, readers: list[str],
                 seed: int = 0) -> dict:
    """``n`` images, half real test images of the model's label from the prepared dataset ``real``, half drawn from
    ``model_uri`` (``seed``), resized to the real images' size, shuffled, under random ids; one token per reader."""
    from PIL import Image

    from sonogen.backends import load_backend
    from sonogen.registry import model_name_of

    out, real = Path(out), Path(real)
    if n < 2 or not readers or len(set(readers)) != len(readers):
        raise ValueError("a study needs n ≥ 2 images and one or more readers with distinct names")
    if (out / STUDY).exists():
        raise ValueError(f"{out} already holds a study; choose another --out")
    backend = load_backend(model_uri)
    if backend is None:
        raise ValueError(f"{model_uri} is not in the registry: nothing to draw the synthetic images from")
    candidates = [r for r in read_manifest(real) if r.split == "test" and r.label == backend.label]
    n_real = n // 2
    if len(candidates) < n_real:
        raise ValueError(f"{real} has {len(candidates)} test images of {backend.label!r}; the study needs {n_real}")
    rng = np.random.default_rng(seed)
    chosen = [candidates[k] for k in rng.choice(len(candidates), n_real, replace=False)]
    real_images = [load_grey(real / record.image) for record in chosen]
    size = real_images[0].shape[::-1]
    drawn = backend.images(n - n_real, seed)
    synthetic = [np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)) if image.shape[::-1]
                 != size else image for image in drawn]
    ids = [secrets.token_hex(6) for _ in range(n)]
    key = {ids[k]: {"source": REAL, "origin": record.image} for k, record in enumerate(chosen)}
    key.update({ids[n_real + k]: {"source": SYNTHETIC, "origin": f"seed={seed};index={k}"} for k in range(n - n_real)})
    (out / "images").mkdir(parents=True)
    for image_id, image in zip(ids, real_images + synthetic):
        (out / "images" / f"{image_id}.png").write_bytes(png_bytes(image))
    order = [ids[k] for k in rng.permutation(n)]
    name = model_name_of(model_uri)
    study = {"model_name": name, "model_version": backend.version, "family": backend.family, "label": backend.label,
             "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "images": order,
             "lesion_question": backend.places_lesions or backend.draws_masks, "readers": readers}
    tokens = {reader: secrets.token_urlsafe(16) for reader in readers}
    (out / PRIVATE).mkdir()
    (out / PRIVATE / KEY).write_text(json.dumps(key, indent=1) + "\n")
    (out / PRIVATE / READERS).write_text(json.dumps(tokens, indent=1) + "\n")
    (out / ANSWERS).mkdir()
    (out / STUDY).write_text(json.dumps(study, indent=1) + "\n")
    return {"out": str(out), "images": n, "real": n_real, "tokens": tokens, **study}


class Study:
    """A study folder, checked; answers are appended and read back per reader."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / STUDY).is_file() or not (self.folder / PRIVATE / READERS).is_file():
            raise ValueError(f"{self.folder} is not a reader study (no {STUDY} and {PRIVATE}/{READERS}): create one "
                             "with `sonogen reader-study create`")
        self.meta = json.loads((self.folder / STUDY).read_text())
        self.tokens = json.loads((self.folder / PRIVATE / READERS).read_text())

    def reader_of(self, token: str) -> str | None:
        return next((reader for reader, known in self.tokens.items() if secrets.compare_digest(known, token)), None)

    def order(self, reader: str) -> list[str]:
        """The reader's own order of the images (every reader a different one, the same on every visit)."""
        index = sorted(self.tokens).index(reader)
        images = self.meta["images"]
        return [images[k] for k in np.random.default_rng([index, len(images)]).permutation(len(images))]

    def answers(self, reader: str) -> list[dict]:
        path = self.folder / ANSWERS / f"{reader}.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def next_image(self, reader: str) -> tuple[int, str | None]:
        answered = {answer["image"] for answer in self.answers(reader)}
        remaining = [image for image in self.order(reader) if image not in answered]
        return len(answered), (remaining[0] if remaining else None)

    def answer(self, reader: str, image: str, answer: str, realism: int, lesion_plausible: bool | None) -> None:
        """Appends the answer to the reader's file and syncs it to disk; only the image the reader is shown next
        may be answered, once."""
        if self.next_image(reader)[1] != image:
            raise ValueError("image: not the image this reader is asked about now (answered already, or not shown)")
        if answer not in (REAL, SYNTHETIC):
            raise ValueError(f"answer: {REAL} or {SYNTHETIC}")
        if isinstance(realism, bool) or not isinstance(realism, int) or not 1 <= realism <= 5:
            raise ValueError("realism: an integer from 1 to 5")
        if self.meta["lesion_question"] and not isinstance(lesion_plausible, bool):
            raise ValueError("lesion_plausible: true or false")
        line = {"image": image, "answer": answer, "realism": realism, "lesion_plausible": lesion_plausible,
                "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        with (self.folder / ANSWERS / f"{reader}.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def image_path(self, image: str) -> Path | None:
        return self.folder / "images" / f"{image}.png" if image in self.meta["images"] else None


def wilson(successes: int, total: int) -> tuple[float, float]:
    """The Wilson 95 % interval of a proportion."""
    if total == 0:
        return float("nan"), float("nan")
    z, p = 1.959964, successes / total
    centre, half = p + z * z / (2 * total), z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return (centre - half) / (1 + z * z / total), (centre + half) / (1 + z * z / total)


def scores(answers: list[dict], key: dict) -> dict:
    """Accuracy at telling synthetic from real (0.5: cannot tell) with its interval, sensitivity (synthetic
    images called synthetic), specificity (real called real) and the mean realism of each source."""
    truth = [key[a["image"]]["source"] for a in answers]
    said = [a["answer"] for a in answers]
    right = sum(t == s for t, s in zip(truth, said))
    low, high = wilson(right, len(answers))
    synthetic = [s for t, s in zip(truth, said) if t == SYNTHETIC]
    real = [s for t, s in zip(truth, said) if t == REAL]

    def realism(source: str) -> float:
        values = [a["realism"] for a, t in zip(answers, truth) if t == source]
        return float(np.mean(values)) if values else float("nan")

    return {"answers": len(answers), "accuracy": right / len(answers) if answers else float("nan"),
            "accuracy_ci95": [low, high],
            "sensitivity": synthetic.count(SYNTHETIC) / len(synthetic) if synthetic else float("nan"),
            "specificity": real.count(REAL) / len(real) if real else float("nan"),
            "realism_real": realism(REAL), "realism_synthetic": realism(SYNTHETIC)}


def fleiss_kappa(ratings: list[list[str]]) -> float:
    """Agreement of several readers' real / synthetic calls on the same images (one list of calls per image)."""
    counts = np.array([[calls.count(REAL), calls.count(SYNTHETIC)] for calls in ratings], dtype=float)
    raters = counts.sum(1)[0]
    agreement = ((counts * (counts - 1)).sum(1) / (raters * (raters - 1))).mean()
    shares = counts.sum(0) / counts.sum()
    expected = (shares ** 2).sum()
    return float((agreement - expected) / (1 - expected)) if expected < 1 else 1.0


def report(folder: str | Path) -> dict:
    """Per reader and pooled scores, agreement on the images every reader answered; ``reader_study.md`` and
    ``.png`` in the study folder."""
    study = Study(folder)
    key = json.loads((study.folder / PRIVATE / KEY).read_text())
    answers = {reader: study.answers(reader) for reader in study.tokens}
    answered = {reader: rows for reader, rows in answers.items() if rows}
    if not answered:
        raise ValueError(f"{folder}: no reader has answered yet; nothing to report")
    common = [image for image in study.meta["images"]
              if all(image in {a["image"] for a in rows} for rows in answered.values())]
    calls = {reader: {a["image"]: a["answer"] for a in rows} for reader, rows in answered.items()}
    result = {"model_name": study.meta["model_name"], "model_version": study.meta["model_version"],
              "images": len(study.meta["images"]), "readers": {r: scores(rows, key) for r, rows in answered.items()},
              "pooled": scores([a for rows in answered.values() for a in rows], key),
              "agreement_fleiss_kappa": fleiss_kappa([[calls[r][i] for r in answered] for i in common])
              if len(answered) > 1 and common else None, "agreement_images": len(common),
              "complete": [r for r, rows in answered.items() if len(rows) == len(study.meta["images"])],
              "date": datetime.now(timezone.utc).date().isoformat()}
    _write(result, study.folder)
    return result


def report_lines(result: dict) -> list[str]:
    pooled = result["pooled"]
    low, high = pooled["accuracy_ci95"]
    lines = [f"{len(result['readers'])} reader(s), {result['date']}, {result['images']} images (half real): accuracy "
             f"at telling synthetic from real {pooled['accuracy']:.3f}, 95% interval [{low:.3f}, {high:.3f}] "
             "(0.5: cannot tell).", "",
             "| reader | answers | accuracy [95%] | sensitivity | specificity | realism real | realism synthetic |",
             "|---|---|---|---|---|---|---|"]
    for name, s in {**result["readers"], "pooled": pooled}.items():
        lines.append(f"| {name} | {s['answers']} | {s['accuracy']:.3f} [{s['accuracy_ci95'][0]:.3f}, "
                     f"{s['accuracy_ci95'][1]:.3f}] | {s['sensitivity']:.3f} | {s['specificity']:.3f} | "
                     f"{s['realism_real']:.2f} | {s['realism_synthetic']:.2f} |")
    if result["agreement_fleiss_kappa"] is not None:
        lines += ["", f"Agreement between readers (Fleiss' kappa on the {result['agreement_images']} images all "
                      f"answered): {result['agreement_fleiss_kappa']:.3f}."]
    return lines


def _write(result: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (folder / REPORT_MD).write_text("\n".join([f"# Reader study: {result['model_name']} v{result['model_version']}",
                                               "", *report_lines(result), ""]))
    rows = {**result["readers"], "pooled": result["pooled"]}
    figure, axis = plt.subplots(figsize=(1.2 * len(rows) + 2, 3.2))
    values = [s["accuracy"] for s in rows.values()]
    errors = np.array([[v - s["accuracy_ci95"][0], s["accuracy_ci95"][1] - v] for v, s in zip(values, rows.values())])
    axis.bar(list(rows), values, yerr=np.clip(errors, 0, None).T, capsize=4)
    axis.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    axis.set(ylim=(0, 1), ylabel="accuracy at spotting synthetic")
    figure.tight_layout()
    figure.savefig(folder / REPORT_PNG, dpi=110)
    plt.close(figure)
    (folder / "reader_study.json").write_text(json.dumps(result, indent=1) + "\n")


def record_in_registry(result: dict, folder: str | Path) -> None:
    """The report to the model version's run (``reader_study/``), its headline as version tags, and a section
    on the model card."""
    import mlflow

    from sonogen.registry import model_card, model_version, write_model_card
    from sonogen.tracking import configure_mlflow

    configure_mlflow()
    name, version = result["model_name"], result["model_version"]
    client = mlflow.MlflowClient()
    run_id = model_version(name, version).run_id
    for file in (REPORT_MD, REPORT_PNG, "reader_study.json"):
        client.log_artifact(run_id, str(Path(folder) / file), "reader_study")
    pooled = result["pooled"]
    for tag, value in {"reader_study.accuracy": pooled["accuracy"], "reader_study.ci_low": pooled["accuracy_ci95"][0],
                       "reader_study.ci_high": pooled["accuracy_ci95"][1], "reader_study.readers":
                       len(result["readers"]), "reader_study.date": result["date"]}.items():
        client.set_model_version_tag(name, version, tag, f"{value:.4g}" if isinstance(value, float) else str(value))
    card = model_card(name, version).split("\n### Reader study\n")[0].rstrip()
    write_model_card(name, version, card + "\n\n### Reader study\n\n" + "\n".join(report_lines(result)) + "\n")
