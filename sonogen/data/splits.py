"""Patient-level train/val/test assignment, in one of two modes.

Hash (the default): a patient's split is a pure function of ``(seed, patient_id, fractions)``: the id is hashed
to a number in [0, 1) and the fractions cut that interval. Deterministic, never one patient in two splits, and
adding patients never moves an existing one. Labels get the fractions only in expectation, so on a few dozen
patients a label can miss a split.

Stratified: within each stratum (a patient's rarest label), patients in hash order fill test, then val, then
train by quota, at least one per non-empty split where the stratum has enough patients. Every label is spread
over the splits, but adding patients can move existing ones; use it for fixed datasets.

No mode can be both: a stable assignment must depend on the patient alone, and then balance holds only in
expectation. ``split_summary`` reports the real counts so a label missing from a split is visible.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

from sonogen.data.manifest import SPLITS, Record


def parse_fractions(text: str | tuple[float, ...] | list[float]) -> tuple[float, float, float]:
    try:
        values = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        values = []
    if len(values) != 3 or any(v < 0 for v in values) or abs(sum(values) - 1) > 1e-6:
        raise ValueError(f"split must be three non-negative fractions train,val,test summing to 1, got {text!r}")
    return values[0], values[1], values[2]


def unit_hash(seed: int, patient_id: str) -> float:
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(patient_id: str, seed: int, fractions: tuple[float, float, float]) -> str:
    u = unit_hash(seed, patient_id)
    train, val, _ = fractions
    if u < train:
        return "train"
    return "val" if u < train + val else "test"


def assign_splits(
    labels_of: dict[str, set[str]], seed: int, fractions: tuple[float, float, float], stratify: bool = False
) -> dict[str, str]:
    """Split of every patient, given each patient's set of labels."""
    if not stratify:
        return {p: assign_split(p, seed, fractions) for p in labels_of}
    patients_with: dict[str, int] = defaultdict(int)
    for labels in labels_of.values():
        for label in labels:
            patients_with[label] += 1
    strata: dict[str, list[str]] = defaultdict(list)
    for patient, labels in labels_of.items():
        strata[min(labels, key=lambda label: (patients_with[label], label))].append(patient)
    splits = {}
    for members in strata.values():
        members.sort(key=lambda p: unit_hash(seed, p))
        n = len(members)
        quota = {name: round(n * f) for name, f in zip(SPLITS, fractions)}
        for name, f in zip(SPLITS[1:], fractions[1:]):
            if f > 0 and quota[name] == 0 and n >= 3:
                quota[name] = 1
        n_test, n_val = quota["test"], min(quota["val"], n - quota["test"])
        for k, patient in enumerate(members):
            splits[patient] = "test" if k < n_test else "val" if k < n_test + n_val else "train"
    return splits


def split_summary(records: list[Record]) -> dict:
    """Images and patients per split and label, and the patients found in more than one split (must be none)."""
    splits_of: dict[str, set[str]] = defaultdict(set)
    summary = {s: {"images": 0, "patients": set(), "labels": defaultdict(int), "label_patients": defaultdict(set)}
               for s in SPLITS}
    for r in records:
        splits_of[r.patient_id].add(r.split)
        entry = summary[r.split]
        entry["images"] += 1
        entry["patients"].add(r.patient_id)
        entry["labels"][r.label] += 1
        entry["label_patients"][r.label].add(r.patient_id)
    return {
        "images": len(records),
        "patients": len(splits_of),
        "patients_in_several_splits": sorted(p for p, s in splits_of.items() if len(s) > 1),
        "splits": {
            s: {
                "images": e["images"],
                "patients": len(e["patients"]),
                "images_per_label": dict(sorted(e["labels"].items())),
                "patients_per_label": {k: len(v) for k, v in sorted(e["label_patients"].items())},
            }
            for s, e in summary.items()
        },
    }
