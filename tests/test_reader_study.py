"""The reader study end to end: a blinded study of a registered version, its page in a real browser (Debian's
Chromium driven by Playwright), answers on disk after every click, and a report checked against a hand count."""

import json
import math
import os
import shutil
import socket
import threading
import time

import pytest
import requests
from typer.testing import CliRunner

from sonogen.cli import app
from sonogen.reader_study import Study

NAME = "lus-dcgan-consolidation"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Real images at the model's size, with 5 or more test images of its label."""
    from sonogen.data.phantom import generate
    from sonogen.data.prepare import prepare

    root = tmp_path_factory.mktemp("reader-real")
    generate(root / "raw", patients=24, frames_per_patient=1, seed=3, consolidation_fraction=0.5)
    prepare(root / "raw", root / "lus", size=32, split="0.5,0.1,0.4", seed=0, stratify=True)
    return root / "lus"


@pytest.fixture(scope="module")
def registry(real, tmp_path_factory):
    """A tiny DCGAN of the real data's label, version 1 in a store of its own (the study writes to its card)."""
    import yaml

    from sonogen.jobs import register_trained, train_generator

    root = tmp_path_factory.mktemp("reader-registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        (root / "tiny.yaml").write_text(yaml.safe_dump({"model": {"image_size": 32, "base_channels": 4},
                                                        "train": {"epochs": 1, "batch_size": 4, "eval_samples": 4}}))
        train_generator("dcgan", real, "consolidation", root / "trained", config_path=root / "tiny.yaml",
                        register=False)
        assert register_trained(root / "trained")["version"] == "1"
    return {"root": root, "uri": uri}


@pytest.fixture
def study(registry, real, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    result = CliRunner().invoke(app, ["reader-study", "create", "--model", f"models:/{NAME}/1", "--real",
                                      str(real), "--out", str(tmp_path / "study"), "-n", "10",
                                      "--reader", "ana", "--reader", "ben"])
    assert result.exit_code == 0, result.output
    return tmp_path / "study"


@pytest.fixture
def served(study):
    import uvicorn

    from sonogen.reader_app import create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(study), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def _key(study):
    return json.loads((study / "private" / "key.json").read_text())


def test_the_study_is_blinded_and_its_key_kept_apart(study):
    meta = json.loads((study / "study.json").read_text())
    key = _key(study)
    assert sorted(meta["images"]) == sorted(key) and len(key) == 10
    assert [entry["source"] for entry in key.values()].count("real") == 5
    assert "source" not in (study / "study.json").read_text() and "real" not in "".join(meta["images"])
    assert sorted(p.stem for p in (study / "images").iterdir()) == sorted(key)
    orders = [Study(study).order(reader) for reader in ("ana", "ben")]
    assert sorted(orders[0]) == sorted(orders[1]) and orders == [Study(study).order(r) for r in ("ana", "ben")]


def test_bad_input_gets_a_clear_answer(study, real, tmp_path, served):
    runner = CliRunner()
    not_a_study = runner.invoke(app, ["reader-study", "report", str(tmp_path)])
    assert not_a_study.exit_code == 1 and "is not a reader study" in not_a_study.output
    missing = runner.invoke(app, ["reader-study", "create", "--model", "models:/nobody@champion", "--real",
                                  str(real), "--out", str(tmp_path / "s2"), "-n", "4"])
    assert missing.exit_code == 1 and "is not in the registry" in missing.output
    too_many = runner.invoke(app, ["reader-study", "create", "--model", f"models:/{NAME}/1", "--real",
                                   str(real), "--out", str(tmp_path / "s3"), "-n", "400"])
    assert (tmp_path / "s3").exists() is False
    assert too_many.exit_code == 1 and "the study needs 200" in too_many.output
    nothing_yet = runner.invoke(app, ["reader-study", "report", str(study)])
    assert nothing_yet.exit_code == 1 and "no reader has answered yet" in nothing_yet.output
    assert requests.get(f"{served}/r/not-a-token", timeout=10).status_code == 403
    assert requests.get(f"{served}/r/not-a-token/images/x.png", timeout=10).status_code == 403
    token = Study(study).tokens["ana"]
    assert requests.get(f"{served}/r/{token}/images/..%2Fprivate%2Fkey.json", timeout=10).status_code == 404
    assert requests.get(f"{served}/private/key.json", timeout=10).status_code == 404
    wrong = requests.post(f"{served}/r/{token}/answers", json={"image": "nope", "answer": "real", "realism": 3},
                          timeout=10)
    assert wrong.status_code == 400 and "image" in wrong.json()["detail"]
    state = requests.get(f"{served}/r/{token}/state", timeout=10).json()
    bad = requests.post(f"{served}/r/{token}/answers", json={"image": state["image"], "answer": "fake",
                                                             "realism": 9}, timeout=10)
    assert bad.status_code == 400 and "answer" in bad.json()["detail"]


def test_a_reader_in_a_browser_then_the_report_matches_a_hand_count(study, served, registry, monkeypatch):
    from playwright.sync_api import sync_playwright

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    key, tokens = _key(study), Study(study).tokens
    answers_file = study / "answers" / "ana.jsonl"
    bodies = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox"] if os.geteuid() == 0 else [])
        page = browser.new_page()
        page.on("response", lambda response: bodies.append(response.body()))
        page.goto(f"{served}/r/{tokens['ana']}")
        # ana calls every image synthetic, with realism 2 for the first and 4 after, by keyboard only
        for number in range(10):
            page.wait_for_selector(f"text=Image {number + 1} of 10")
            page.keyboard.press("s")
            page.keyboard.press("2" if number == 0 else "4")
            page.keyboard.press("Enter")
            page.wait_for_function(f"document.getElementById('progress').textContent.startsWith('Image {number + 2} ')"
                                   " || !document.getElementById('done').hidden")
            assert len(answers_file.read_text().splitlines()) == number + 1  # on disk before the next image
            if number == 3:  # a reload resumes at the next image
                page.reload()
                page.wait_for_selector("text=Image 5 of 10")
        page.wait_for_selector("text=Thank you")
        page.screenshot(path=str(study / "screenshot.png"))
        browser.close()
    everything = b"".join(bodies)
    assert b"key.json" not in everything and b'"source"' not in everything and b"origin" not in everything

    # ben answers over HTTP: right on every image, realism 5 for real images and 1 for synthetic ones
    ben = tokens["ben"]
    while (state := requests.get(f"{served}/r/{ben}/state", timeout=10).json())["image"]:
        truth = key[state["image"]]["source"]
        requests.post(f"{served}/r/{ben}/answers", json={"image": state["image"], "answer": truth,
                                                          "realism": 5 if truth == "real" else 1}, timeout=10)

    result = CliRunner().invoke(app, ["reader-study", "report", str(study)])
    assert result.exit_code == 0, result.output
    report = json.loads((study / "reader_study.json").read_text())
    first = json.loads(answers_file.read_text().splitlines()[0])
    # by hand: ana is right on the 5 synthetic images only, ben on all 10
    assert report["readers"]["ana"]["accuracy"] == 0.5 and report["readers"]["ben"]["accuracy"] == 1.0
    assert report["readers"]["ana"]["sensitivity"] == 1.0 and report["readers"]["ana"]["specificity"] == 0.0
    assert report["pooled"]["accuracy"] == 15 / 20
    p, z, total = 15 / 20, 1.959964, 20  # Wilson's interval by hand
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    assert report["pooled"]["accuracy_ci95"] == pytest.approx([centre - half, centre + half])
    ana_real = [2 if json.loads(line)["image"] == first["image"] else 4 for line in answers_file.read_text().splitlines()
                if key[json.loads(line)["image"]]["source"] == "real"]
    assert report["readers"]["ana"]["realism_real"] == pytest.approx(sum(ana_real) / 5)
    assert report["readers"]["ben"]["realism_synthetic"] == 1.0
    # agreement: on the 5 synthetic images both said synthetic, on the 5 real ones they split: P = 0.5; shares of
    # calls 15/20 synthetic, 5/20 real: P_e = 0.625; kappa = (0.5 - 0.625) / 0.375
    assert report["agreement_fleiss_kappa"] == pytest.approx(-1 / 3)
    import mlflow

    version = mlflow.MlflowClient(registry["uri"]).get_model_version(NAME, "1")
    assert version.tags["reader_study.readers"] == "2" and float(version.tags["reader_study.accuracy"]) == 0.75
    assert "### Reader study" in version.description and "0.750" in version.description

    # a gate set with max_reader_accuracy_upper_ci (tagged on the version by evaluate) holds promotion back
    from sonogen.evaluation import gate_tags

    assert gate_tags({"passed": True, "extractor": "x", "gates": [], "max_reader_accuracy_upper_ci": 0.6})[
        "gate.max_reader_accuracy_upper_ci"] == "0.6"
    client = mlflow.MlflowClient(registry["uri"])
    client.set_model_version_tag(NAME, "1", "gate", "passed")
    client.set_model_version_tag(NAME, "1", "gate.max_reader_accuracy_upper_ci", "0.6")
    refused = CliRunner().invoke(app, ["registry", "promote", NAME, "1", "--to", "champion"])
    assert refused.exit_code == 1 and "above max_reader_accuracy_upper_ci 0.6" in refused.output
    forced = CliRunner().invoke(app, ["registry", "promote", NAME, "1", "--to", "champion", "--force", "--reason",
                                      "readers were trainees"])
    assert forced.exit_code == 0, forced.output
