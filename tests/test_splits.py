import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sonogen.data.manifest import Record
from sonogen.data.splits import assign_split, assign_splits, parse_fractions, split_summary

patient_ids = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=60, unique=True)
fractions = st.tuples(st.integers(0, 10), st.integers(0, 10), st.integers(0, 10)).filter(sum).map(
    lambda t: tuple(v / sum(t) for v in t)
)


def _records(patients, images_per_patient=3):
    return [Record(image=f"{p}-{k}.png", patient_id=p, source="s", label=["a", "b"][len(p) % 2])
            for p in patients for k in range(images_per_patient)]


@settings(max_examples=200, deadline=None)
@given(patient_ids, fractions, st.integers(0, 2**31))
def test_no_patient_in_two_splits(patients, split, seed):
    records = _records(patients)
    for r in records:
        r.split = assign_split(r.patient_id, seed, split)
    summary = split_summary(records)
    assert summary["patients_in_several_splits"] == []
    assert sum(s["patients"] for s in summary["splits"].values()) == len(patients)
    assert sum(s["images"] for s in summary["splits"].values()) == len(records)


@settings(max_examples=200, deadline=None)
@given(patient_ids, patient_ids, fractions, st.integers(0, 2**31))
def test_adding_patients_moves_nobody(before, added, split, seed):
    first = {p: assign_split(p, seed, split) for p in before}
    second = {p: assign_split(p, seed, split) for p in before + added}
    assert all(second[p] == s for p, s in first.items())


@given(st.integers(0, 2**31))
def test_zero_fraction_split_stays_empty(seed):
    assert {assign_split(f"p{k}", seed, (0.8, 0.2, 0.0)) for k in range(50)} <= {"train", "val"}


def test_fractions_hold_on_many_patients():
    counts = {"train": 0, "val": 0, "test": 0}
    for k in range(20000):
        counts[assign_split(f"patient-{k}", 5, (0.7, 0.15, 0.15))] += 1
    assert counts["train"] / 20000 == pytest.approx(0.7, abs=0.01)
    assert counts["test"] / 20000 == pytest.approx(0.15, abs=0.01)


def test_seed_changes_the_split():
    a = [assign_split(f"p{k}", 0, (0.5, 0.25, 0.25)) for k in range(100)]
    b = [assign_split(f"p{k}", 1, (0.5, 0.25, 0.25)) for k in range(100)]
    assert a != b


@pytest.mark.parametrize("text", ["0.7,0.3", "0.7,0.2,0.2", "-0.1,0.6,0.5", "a,b,c"])
def test_bad_fractions_are_rejected(text):
    with pytest.raises(ValueError):
        parse_fractions(text)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=8), st.sets(st.sampled_from("abc"), min_size=1), max_size=80),
       st.integers(0, 2**31))
def test_stratified_split_spreads_every_label(labels_of, seed):
    splits = assign_splits(labels_of, seed, (0.6, 0.2, 0.2), stratify=True)
    assert set(splits) == set(labels_of)
    for label in "abc":
        stratum = [p for p, labels in labels_of.items() if labels == {label}]
        if len(stratum) >= 3 and all(len(labels) == 1 for labels in labels_of.values()):
            assert {splits[p] for p in stratum} == {"train", "val", "test"}


def test_stratified_split_is_balanced_where_hashing_is_not():
    labels_of = {f"phantom-{k:04d}": {"consolidation" if k % 2 else "normal"} for k in range(24)}
    hashed = assign_splits(labels_of, 0, (0.7, 0.15, 0.15))
    stratified = assign_splits(labels_of, 0, (0.7, 0.15, 0.15), stratify=True)

    def count(splits, split, label):
        return sum(1 for p, labels in labels_of.items() if splits[p] == split and label in labels)

    assert count(hashed, "test", "consolidation") == 0  # 24 patients are too few for hashing to balance
    for split, expected in (("train", 8), ("val", 2), ("test", 2)):
        for label in ("consolidation", "normal"):
            assert count(stratified, split, label) == expected
