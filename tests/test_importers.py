import csv
import json

import numpy as np
import pytest
from PIL import Image

from conftest import fan_frame, write_dicom, write_video
from sonogen.data.frames import read_video, to_grey
from sonogen.data.importers import import_busi, import_dicom, import_folder, import_pocus
from sonogen.data.pseudonyms import PseudonymKey
from sonogen.data.importers.pocus import group_patients, label_of, series_of
from sonogen.data.manifest import file_sha256, load_grey, read_manifest
from sonogen.data.writer import StrictImportError


def _reconciles(report: dict) -> None:
    assert report["files_seen"] == report["files_imported"] + report["files_skipped"]
    assert report["files_skipped"] == len(report["skipped"])


def _valid_dataset(root) -> list:
    records = read_manifest(root)
    for r in records:
        with Image.open(root / r.image) as im:
            assert im.mode == "L"
        assert file_sha256(root / r.image) == r.sha256
        assert r.split == ""
    return records


def test_pocus_import_labels_licences_patients_and_skips(pocus_tree, tmp_path):
    out = tmp_path / "raw"
    report = import_pocus(pocus_tree, out, fps=3)
    _reconciles(report)
    assert report == json.loads((out / "import_report.json").read_text())
    assert report["files_seen"] == 11
    reasons = {s["file"].rsplit("/", 1)[-1]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"Cov_empty_clip.mp4", "Cov_truncated_clip.mp4", "Reg_notes.txt", "Unlabelled_clip.mp4"}
    assert reasons["Cov_empty_clip.mp4"] == "empty file"
    assert reasons["Cov_truncated_clip.mp4"].startswith("unreadable")
    assert "unknown file type" in reasons["Reg_notes.txt"]
    assert "label prefix" in reasons["Unlabelled_clip.mp4"]

    records = _valid_dataset(out)
    by_file = {}
    for r in records:
        by_file.setdefault(r.origin.rsplit("#", 1)[0].rsplit("/", 1)[-1], []).append(r)
    # 2 s of 10 fps video at 3 fps: t = 0, 0.4 (first frame at or after 1/3), 0.7, 1.0, 1.4, 1.7 s
    assert [int(r.origin.rsplit("#", 1)[1]) for r in sorted(by_file["Pneu_northumbria_0409_set2_vid1.mp4"],
            key=lambda r: int(r.origin.rsplit("#", 1)[1]))] == [0, 4, 7, 10, 14, 17]
    # the GIF's frames start at 0, 0.1, 0.6, 0.7 s: sampled by time (0, 0.6, 0.7), not by count
    assert sorted(int(r.origin.rsplit("#", 1)[1]) for r in by_file["Reg-Atlas-alines.gif"]) == [0, 2, 3]
    assert {r.label for r in by_file["Cov_Oliviera_2020_Fig4A.jpg"]} == {"covid"}
    assert {r.label for r in by_file["Pneu_emdocs_1.png"]} == {"pneumonia"}
    assert {r.label for r in by_file["Reg_pat1Image_000001.mpeg"]} == {"normal"}
    assert {r.licence for r in by_file["Pneu_emdocs_1.png"]} == {"CC BY 4.0"}
    assert {r.licence for r in by_file["Reg-Atlas-alines.gif"]} == {"unknown"}
    # same metadata patient id → one patient; same recording set → one patient
    assert by_file["Cov_Oliviera_2020_Fig4A.jpg"][0].patient_id == by_file["Cov_Oliviera_2020_Fig15A.jpg"][0].patient_id
    vid1, vid2 = by_file["Pneu_northumbria_0409_set2_vid1.mp4"], by_file["Pneu_northumbria_0409_set2_vid2.avi"]
    assert {r.patient_id for r in vid1} == {r.patient_id for r in vid2}
    assert by_file["Pneu_emdocs_1.png"][0].patient_id != by_file["Cov_Oliviera_2020_Fig4A.jpg"][0].patient_id


def test_pocus_names_and_grouping():
    assert label_of("pneu-radiopaeda.mp4") == "pneumonia"
    assert label_of("Cov-Atlas+(44).gif") == "covid"
    assert label_of("Vir_whitelung_h1n1.mp4") == "viral"
    assert label_of("Covered_image.png") is None
    assert series_of("Pneu_northumbria_0409_set2_vid4") == "northumbria_0409_set2"
    assert series_of("Reg_liftl_pneucase3_clip1") == series_of("Pneu_liftl_pneu_case3_clip3") == "liftl_case3"
    assert series_of("Reg_Avi_Video_001") is None
    metadata = {"a": {"Patient ID / Name": "7", "Source ID": "2"}, "b": {"Patient ID / Name": "7", "Source ID": "2"},
                "d": {"Patient ID / Name": "7", "Source ID": "16"}, "Reg_x_set1_vid1": {}}
    ids = group_patients(["a", "b", "c", "d", "Reg_x_set1_vid1", "Pneu_x_set1_vid2"], metadata)
    assert ids["a"] == ids["b"] == "pocus-s2-id7"
    assert ids["d"] == "pocus-s16-id7", "patient 7 of another source is another patient"
    assert ids["Reg_x_set1_vid1"] == ids["Pneu_x_set1_vid2"] != ids["c"]
    assert len(set(ids.values())) == 4


def test_strict_import_fails_naming_every_skip_and_writes_nothing(pocus_tree, tmp_path):
    out = tmp_path / "raw"
    with pytest.raises(StrictImportError, match="4 file") as failure:
        import_pocus(pocus_tree, out, strict=True)
    for name in ("Cov_empty_clip.mp4", "Cov_truncated_clip.mp4", "Reg_notes.txt", "Unlabelled_clip.mp4"):
        assert f"data/pocus_videos/convex/{name}: " in str(failure.value)
    assert not out.exists() and not list(tmp_path.glob(".raw.*"))


def test_busi_merges_masks_derives_boxes_and_reports_orphans(busi_tree, tmp_path):
    out = tmp_path / "raw"
    report = import_busi(busi_tree, out)
    _reconciles(report)
    assert report["files_seen"] == 10 and report["files_imported"] == 7
    reasons = {s["file"]: s["reason"] for s in report["skipped"]}
    assert reasons["malignant/malignant (9)_mask.png"] == "mask without an image"
    assert reasons["benign/benign (2).png"].startswith("unreadable")
    assert reasons["benign/benign (2)_mask.png"] == "belongs to skipped benign/benign (2).png"
    records = {r.origin: r for r in _valid_dataset(out)}
    benign = records["benign/benign (1).png#0"]
    assert benign.label == "benign" and benign.boxes == [[10, 12, 30, 25], [50, 30, 70, 50]]
    assert load_grey(out / benign.mask).astype(bool).sum() == 20 * 13 + 20 * 20
    normal = records["normal/normal (3).png#0"]
    assert normal.boxes == [] and normal.mask and not load_grey(out / normal.mask).any()
    assert records["malignant/malignant (7).png#0"].boxes == [[5, 5, 25, 40]]


def test_folder_import_with_boxes_csv(tmp_path, rng):
    src = tmp_path / "folder"
    (src / "consolidation").mkdir(parents=True)
    (src / "normal").mkdir()
    Image.fromarray(fan_frame(rng)).save(src / "consolidation" / "a.png")
    Image.fromarray(np.stack([fan_frame(rng)] * 3, axis=-1)).save(src / "normal" / "b.jpg")
    write_video(src / "consolidation" / "clip.mp4", [fan_frame(rng) for _ in range(10)])
    Image.fromarray(fan_frame(rng)).save(src / "normal" / "bad_box.png")
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(
        "image,frame,x0,y0,x1,y1,patient_id\n"
        "consolidation/a.png,0,10,20,30,40,p1\n"
        "consolidation/a.png,0,40,20,50,30,p1\n"
        "consolidation/clip.mp4,3,1,2,3,4,p1\n"
        "normal/bad_box.png,0,90,10,120,20,\n"
    )
    report = import_folder(src, tmp_path / "raw", boxes_csv=boxes, fps=10)
    _reconciles(report)
    assert [s["file"] for s in report["skipped"]] == ["normal/bad_box.png"]
    assert "outside the 96x72 image" in report["skipped"][0]["reason"]
    records = {r.origin: r for r in _valid_dataset(tmp_path / "raw")}
    assert records["consolidation/a.png#0"].boxes == [[10, 20, 30, 40], [40, 20, 50, 30]]
    assert records["consolidation/clip.mp4#3"].boxes == [[1, 2, 3, 4]]
    assert records["consolidation/clip.mp4#4"].boxes == []
    assert records["consolidation/a.png#0"].patient_id == records["consolidation/clip.mp4#3"].patient_id == "p1"
    assert records["normal/b.jpg#0"].label == "normal"


def test_dicom_single_multiframe_and_no_personal_data(tmp_path, rng):
    src = tmp_path / "dicom"
    (src / "consolidation").mkdir(parents=True)
    (src / "normal").mkdir()
    cine = np.stack([fan_frame(rng) for _ in range(12)])
    write_dicom(src / "consolidation" / "cine.dcm", cine, "MRN-0042", frame_time_ms=100.0)
    write_dicom(src / "normal" / "still.dcm", cine[:1], "MRN-0042", rgb=True)
    write_dicom(src / "normal" / "other.dcm", cine[:1], "MRN-0099")
    (src / "normal" / "broken.dcm").write_bytes(b"DICM" + b"\x01" * 40)
    key = PseudonymKey(b"k" * 32)
    report = import_dicom(src, tmp_path / "raw", key, fps=3)
    _reconciles(report)
    assert [s["file"] for s in report["skipped"]] == [key.digest("path", "normal/broken.dcm")]
    records = _valid_dataset(tmp_path / "raw")
    cine_origin = key.digest("path", "consolidation/cine.dcm")
    cine_frames = sorted(int(r.origin.split("#")[1]) for r in records if r.origin.startswith(cine_origin))
    assert cine_frames == [0, 4, 7, 10]  # 100 ms frames sampled at 3 per second
    still = next(r for r in records if r.origin.startswith(key.digest("path", "normal/still.dcm")))
    assert np.array_equal(load_grey(tmp_path / "raw" / still.image), cine[0])  # RGB grey → same luminance
    other = key.digest("path", "normal/other.dcm")
    assert {r.patient_id for r in records if not r.origin.startswith(other)} == {
        f"pid-{key.digest('patient', 'MRN-0042')}"}
    text = (tmp_path / "raw" / "manifest.csv").read_text() + (tmp_path / "raw" / "import_report.json").read_text()
    for personal in ("MRN-0042", "Doe", "19700101", "General Hospital"):
        assert personal not in text


def test_zero_frame_video_is_skipped(tmp_path):
    import av

    src = tmp_path / "folder" / "normal"
    src.mkdir(parents=True)
    with av.open(str(src / "nothing.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()
        for packet in stream.encode():
            container.mux(packet)
    assert (src / "nothing.mp4").stat().st_size > 0
    report = import_folder(tmp_path / "folder", tmp_path / "raw")
    assert report["files_seen"] == report["files_skipped"] == 1
    assert report["skipped"][0]["reason"] in ("no video stream", "no decodable frames")


def test_grey_by_luminance_keeps_tinted_structure():
    ramp = np.linspace(0, 1, 50)
    purple = np.stack([ramp * 180, ramp * 60, ramp * 200], axis=-1).astype(np.uint8)[None]
    grey = to_grey(purple)[0]
    assert np.all(np.diff(grey.astype(int)) >= 0) and grey[-1] == round(0.299 * 180 + 0.587 * 60 + 0.114 * 200)


def test_read_video_rejects_bad_fps(tmp_path, rng):
    write_video(tmp_path / "v.mp4", [fan_frame(rng) for _ in range(3)])
    with pytest.raises(ValueError, match="fps"):
        read_video(tmp_path / "v.mp4", 0)


def test_import_refuses_foreign_non_empty_folder(pocus_tree, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    with pytest.raises(FileExistsError):
        import_pocus(pocus_tree, out)
    assert (out / "thesis.tex").exists()


def test_reimport_replaces_previous_dataset(pocus_tree, tmp_path):
    out = tmp_path / "raw"
    import_pocus(pocus_tree, out)
    first = (out / "manifest.csv").read_text()
    (pocus_tree / "data" / "pocus_images" / "convex" / "Pneu_emdocs_1.png").unlink()
    import_pocus(pocus_tree, out)
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert len(rows) == len(first.splitlines()) - 2
    assert not any("emdocs" in p.name for p in (out / "images").iterdir())
