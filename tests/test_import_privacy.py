"""Imports as a hospital runs them: keyed pseudonyms, no personal data in anything written (names, manifest,
report, PNG bytes), burned-in annotation, atomic imports (a failed or SIGKILLed import leaves the target as it
was), a pixel limit read from headers, and every path of the source accounted for."""

import json
import os
import signal
import stat
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import fan_frame, write_dicom
from PIL import Image
from typer.testing import CliRunner

from sonogen.cli import app
from sonogen.data.importers import import_dicom, import_folder
from sonogen.data.manifest import read_manifest
from sonogen.data.prepare import prepare
from sonogen.data.pseudonyms import KEY_ENV, PseudonymKey, create_key

KEY_A, KEY_B = "a1" * 32, "b2" * 32
PERSONAL = ("MRN0012345", "MRN0077", "DOE", "JOHN", "Jane", "19700101", "General Hospital", "DOE_JOHN")


def written(folder: Path) -> list[tuple[str, bytes]]:
    """Every file an import wrote, as (path relative to the folder, bytes)."""
    return [(p.relative_to(folder).as_posix(), p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()]


def assert_nothing_personal(folder: Path, values=PERSONAL) -> None:
    for name, content in written(folder):
        for value in values:
            assert value.lower() not in name.lower(), f"{value!r} in the file name {name}"
            assert value.encode() not in content and value.lower().encode() not in content.lower(), \
                f"{value!r} in {name}"


@pytest.fixture
def archive(tmp_path, rng) -> Path:
    """DICOMs as an archive holds them: named after the patient, with names, ids, dates and an institution."""
    src = tmp_path / "archive"
    (src / "consolidation").mkdir(parents=True)
    (src / "normal").mkdir()
    cine = np.stack([fan_frame(rng) for _ in range(6)])
    write_dicom(src / "consolidation" / "DOE_JOHN_MRN0012345_19700101.dcm", cine, "MRN0012345", frame_time_ms=200.0)
    write_dicom(src / "normal" / "DOE_JOHN_MRN0012345_followup.dcm", cine[:1], "MRN0012345")
    write_dicom(src / "normal" / "jane_MRN0077.dcm", cine[:1], "MRN0077")
    write_dicom(src / "normal" / "annotated.dcm", cine[:1], "MRN0077", burned_in="YES")
    write_dicom(src / "normal" / "untagged.dcm", cine[:1], "MRN0077", burned_in=None)
    (src / "normal" / "notes.dcm").write_text("Patient DOE JOHN, seen 19700101")
    return src


def test_dicom_pseudonyms_are_keyed_and_nothing_personal_is_written(archive, tmp_path):
    a = import_dicom(archive, tmp_path / "a", PseudonymKey.from_text(KEY_A, "a"))
    again = import_dicom(archive, tmp_path / "again", PseudonymKey.from_text(KEY_A, "a"))
    b = import_dicom(archive, tmp_path / "b", PseudonymKey.from_text(KEY_B, "b"))
    assert a["files_seen"] == 6 == a["files_imported"] + a["files_skipped"]
    reasons = {s["reason"].split(":")[0].split(" (")[0] for s in a["skipped"]}
    assert reasons == {"BurnedInAnnotation is YES", "no BurnedInAnnotation on a US image", "not a DICOM file"}
    records = {name: read_manifest(tmp_path / name) for name in ("a", "again", "b")}
    patients = {name: sorted({r.patient_id for r in rows}) for name, rows in records.items()}
    assert len(patients["a"]) == 2 and patients["a"] == patients["again"]  # the same key: the same pseudonyms
    assert not set(patients["a"]) & set(patients["b"])  # another key: unrelated ones
    assert [r.image for r in records["a"]] == [r.image for r in records["again"]]
    assert all(r.image.startswith(f"images/{r.patient_id}-") for r in records["a"])
    for name in ("a", "b"):
        assert_nothing_personal(tmp_path / name, PERSONAL + (KEY_A, KEY_B))
    report = json.loads((tmp_path / "a" / "import_report.json").read_text())
    assert report["pseudonyms"].startswith("keyed") and PseudonymKey.from_text(KEY_A, "a").key_id in report["pseudonyms"]
    assert a["pseudonyms"] != b["pseudonyms"]


def test_a_keyed_pseudonym_resists_guessing_the_id_without_the_key(archive, tmp_path):
    import hashlib

    import_dicom(archive, tmp_path / "raw", PseudonymKey.from_text(KEY_A, "a"))
    pseudonyms = {r.patient_id for r in read_manifest(tmp_path / "raw")}
    guesses = {f"MRN{n:07d}" for n in range(12340, 12350)} | {"MRN0077"}
    for guess in guesses:  # what reversed the old salted hashes: trying id formats, the salt being public
        for digest in (hashlib.sha256(guess.encode()).hexdigest(), hashlib.sha256(f"sonogen-dicom-v1:{guess}".encode())
                       .hexdigest()):
            assert not any(digest[:16] in p for p in pseudonyms)
    assert f"pid-{PseudonymKey.from_text(KEY_A, 'a').digest('patient', 'MRN0012345')}" in pseudonyms


def test_burned_in_frames_import_only_when_allowed_and_prepare_drops_or_keeps_them(archive, tmp_path):
    key = PseudonymKey.from_text(KEY_A, "a")
    report = import_dicom(archive, tmp_path / "raw", key, allow_burned_in=True)
    assert report["flagged"] == {"burned_in_annotation": 2}
    assert [s["reason"].split(" (")[0] for s in report["skipped"]] == ["not a DICOM file"]
    flagged = [r for r in read_manifest(tmp_path / "raw") if r.flags == "burned_in_annotation"]
    assert len(flagged) == 2
    dropped = prepare(tmp_path / "raw", tmp_path / "dropped", size=32, seed=0)
    kept = prepare(tmp_path / "raw", tmp_path / "kept", size=32, seed=0, burned_in="blank")
    assert dropped["burned_in"] == {"flagged": 2, "handling": "drop", "dropped": 2}
    assert dropped["images"] == kept["images"] - 2
    assert {r.flags for r in read_manifest(tmp_path / "kept")} == {"", "burned_in_annotation"}
    assert dropped["pseudonyms"].startswith("keyed")


def test_the_dicom_command_needs_a_key_and_can_make_one(archive, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    runner = CliRunner()
    out = tmp_path / "raw"
    refused = runner.invoke(app, ["data", "import", "dicom", str(archive), str(out)])
    assert refused.exit_code == 1 and "no pseudonym key" in refused.output and "--new-pseudonym-key" in refused.output
    assert not out.exists()
    inside = runner.invoke(app, ["data", "import", "dicom", str(archive), str(out), "--new-pseudonym-key",
                                 str(out / "key")])
    assert inside.exit_code == 1 and "inside the dataset folder" in inside.output
    key_file = tmp_path / "secrets" / "pseudonym.key"
    made = runner.invoke(app, ["data", "import", "dicom", str(archive), str(out), "--new-pseudonym-key", str(key_file)])
    assert made.exit_code == 0, made.output
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(bytes.fromhex(key_file.read_text().strip())) == 32
    first = read_manifest(out)
    assert runner.invoke(app, ["data", "import", "dicom", str(archive), str(out), "--new-pseudonym-key",
                               str(key_file)]).exit_code == 1  # a key is never overwritten
    monkeypatch.setenv(KEY_ENV, key_file.read_text().strip())
    assert runner.invoke(app, ["data", "import", "dicom", str(archive), str(out)]).exit_code == 0
    assert read_manifest(out) == first  # the key from the environment: the same dataset
    digest = next(r.origin for r in first if r.label == "consolidation")  # the cine of DOE_JOHN_MRN0012345
    located = runner.invoke(app, ["data", "locate", str(archive), digest])
    assert located.exit_code == 0 and "DOE_JOHN_MRN0012345" in located.output


def test_anonymised_folder_import_keeps_no_source_name(tmp_path, rng, monkeypatch):
    src = tmp_path / "clinic"
    (src / "normal" / "DOE_JOHN").mkdir(parents=True)
    Image.fromarray(fan_frame(rng)).save(src / "normal" / "DOE_JOHN" / "MRN0012345_19700101.png")
    monkeypatch.setenv(KEY_ENV, KEY_A)
    result = CliRunner().invoke(app, ["data", "import", "folder", str(src), str(tmp_path / "raw"), "--anonymise-names"])
    assert result.exit_code == 0, result.output
    [record] = read_manifest(tmp_path / "raw")
    assert record.patient_id.startswith("pid-")
    assert_nothing_personal(tmp_path / "raw")


def test_a_strict_import_that_fails_leaves_the_target_as_it_was(tmp_path, rng):
    src = tmp_path / "folder"
    (src / "normal").mkdir(parents=True)
    Image.fromarray(fan_frame(rng)).save(src / "normal" / "a.png")
    out = tmp_path / "raw"
    import_folder(src, out)
    before = written(out)
    Image.fromarray(fan_frame(rng)).save(src / "normal" / "b.png")
    (src / "normal" / "c.txt").write_text("not an image")
    with pytest.raises(Exception, match="--strict: 1 file"):
        import_folder(src, out, strict=True)
    assert written(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_import_killed_mid_way_leaves_the_target_as_it_was(tmp_path, rng):
    src = tmp_path / "folder"
    (src / "normal").mkdir(parents=True)
    for k in range(12):
        Image.fromarray(fan_frame(rng, shift=k)).save(src / "normal" / f"f{k:02d}.png")
    out = tmp_path / "raw"
    import_folder(src, out)
    before = written(out)
    (src / "normal" / "f00.png").unlink()
    script = ("import sys, time\nfrom sonogen.data.importers import common\nread = common.read_media\n"
              "common.read_media = lambda *a, **k: (time.sleep(0.3), read(*a, **k))[1]\n"
              "from sonogen.data.importers import import_folder\nimport_folder(sys.argv[1], sys.argv[2])\n")
    process = subprocess.Popen([sys.executable, "-c", script, str(src), str(out)])
    deadline = time.time() + 60
    while not any(tmp_path.glob(".raw.staging-*/images/*.png")):
        assert process.poll() is None and time.time() < deadline, "the import ended before it could be killed"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert written(out) == before
    import_folder(src, out)  # the next import clears what the killed one left and publishes
    assert len(read_manifest(out)) == 11 and not list(tmp_path.glob(".raw.*"))


def huge_png(path: Path, side: int) -> None:
    """A valid all-black greyscale PNG of ``side``² pixels, a few hundred KB on disk, written row by row."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row = zlib.compressobj(9), b"\0" * (side + 1)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_a_144_megapixel_png_is_skipped_from_its_header(tmp_path, rng):
    src = tmp_path / "folder"
    (src / "normal").mkdir(parents=True)
    Image.fromarray(fan_frame(rng)).save(src / "normal" / "fine.png")
    script = ("import json, resource, sys\nfrom sonogen.data.importers import import_folder\n"
              "report = import_folder(sys.argv[1], sys.argv[2])\n"
              "print(json.dumps([report, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))\n")

    def run(out: str) -> tuple[dict, int]:
        done = subprocess.run([sys.executable, "-c", script, str(src), str(tmp_path / out)], capture_output=True,
                              text=True, timeout=120, check=True)
        return tuple(json.loads(done.stdout.splitlines()[-1]))

    _, baseline_kb = run("small")
    huge_png(src / "normal" / "bomb.png", 12_000)
    assert (src / "normal" / "bomb.png").stat().st_size < 1_000_000
    report, peak_kb = run("raw")
    assert report["files_imported"] == 1
    [skip] = report["skipped"]
    assert skip["file"] == "normal/bomb.png" and "12000x12000 = 144.0 Mpx, over the 16 Mpx limit" in skip["reason"]
    assert peak_kb - baseline_kb < 50_000, f"peak memory grew by {peak_kb - baseline_kb} KB: the image was decoded"


def test_every_path_of_the_source_is_accounted_for(tmp_path, rng):
    src = tmp_path / "folder"
    (src / "normal" / "more").mkdir(parents=True)
    Image.fromarray(fan_frame(rng)).save(src / "normal" / "real.png")
    Image.fromarray(fan_frame(rng)).save(src / "normal" / "more" / "nested.png")
    (src / "normal" / "good-link.png").symlink_to(src / "normal" / "real.png")
    (src / "normal" / "dangling.png").symlink_to(src / "normal" / "gone.png")
    (src / "normal" / "self.png").symlink_to(src / "normal" / "self.png")
    (src / "normal" / "ping.png").symlink_to(src / "normal" / "pong.png")
    (src / "normal" / "pong.png").symlink_to(src / "normal" / "ping.png")
    (src / "normal" / "folder-link").symlink_to(src / "normal" / "more")
    (src / "normal" / ".DS_Store").write_bytes(b"\0")
    (src / "README.txt").write_text("not in a label folder")
    report = import_folder(src, tmp_path / "raw")
    reasons = {s["file"]: s["reason"] for s in report["skipped"]}
    assert reasons == {
        "normal/dangling.png": "symbolic link to a missing file",
        "normal/self.png": "symbolic link loop",
        "normal/ping.png": "symbolic link loop",
        "normal/pong.png": "symbolic link loop",
        "normal/folder-link": "symbolic link to a folder (not followed)",
        "normal/.DS_Store": "hidden file",
        "README.txt": "not inside a label folder",
    }
    assert report["files_imported"] == 3 and report["files_seen"] == 10
