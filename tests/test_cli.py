from typer.testing import CliRunner

from sonogen.cli import app
from sonogen.data.manifest import read_manifest

runner = CliRunner()


def test_help_lists_the_data_commands():
    result = runner.invoke(app, ["data", "--help"])
    assert result.exit_code == 0
    for command in ("phantom", "import", "prepare"):
        assert command in result.output
    result = runner.invoke(app, ["data", "import", "--help"])
    for source in ("pocus", "busi", "folder", "dicom"):
        assert source in result.output


def test_phantom_then_prepare_from_the_command_line(tmp_path):
    raw, prep = tmp_path / "raw", tmp_path / "prep"
    result = runner.invoke(app, ["data", "phantom", str(raw), "--patients", "3", "--frames-per-patient", "1"])
    assert result.exit_code == 0, result.output
    assert "files seen 3 = imported 3 + skipped 0" in result.output
    result = runner.invoke(app, ["data", "prepare", str(raw), str(prep), "--size", "32", "--stratify"])
    assert result.exit_code == 0, result.output
    assert "0 patients in more than one split" in result.output
    assert len(read_manifest(prep)) == 3


def test_strict_import_exits_nonzero_with_a_message(pocus_tree, tmp_path):
    result = runner.invoke(app, ["data", "import", "pocus", str(pocus_tree), str(tmp_path / "raw"), "--strict"])
    assert result.exit_code == 1
    assert "--strict: 4 file(s) skipped" in result.output
    result = runner.invoke(app, ["data", "import", "pocus", str(pocus_tree), str(tmp_path / "raw")])
    assert result.exit_code == 0
    assert "skipped data/pocus_videos/convex/Cov_empty_clip.mp4: empty file" in result.output


def test_missing_source_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["data", "import", "busi", str(tmp_path), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "none of the BUSI folders" in result.output
    result = runner.invoke(app, ["data", "prepare", str(tmp_path), str(tmp_path / "out")])
    assert result.exit_code == 1 and "manifest.csv not found" in result.output
