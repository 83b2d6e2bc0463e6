"""Export, the KServe predictor as a real server on loopback (v1, v2, determinism, batching, every error case,
auth), the sampling client, and promotion in a temporary MLflow registry picked up by a watching server."""

import base64
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import mlflow
import numpy as np
import pytest
import requests
from PIL import Image
from conftest import NAME, start_server, stop_server
from typer.testing import CliRunner

from sonogen.cli import app
from sonogen.generators import to_uint8
from sonogen.jobs import register_trained
from sonogen.registry import load_registered_generator
from sonogen.sampling import png_bytes

TOKEN = "s3cret"
MAX_N, MAX_BATCH = 24, 4


def _start_server(registry, *args):
    return start_server(registry["root"], registry["uri"], NAME, *args)


@pytest.fixture(scope="module")
def server(registry):
    process, url = _start_server(registry, "--version", "1", "--token", TOKEN, "--max-n", str(MAX_N),
                                 "--max-batch", str(MAX_BATCH), "--max-body-bytes", "2048")
    yield url
    stop_server(process)


def predict(url, body, token=TOKEN, **kwargs):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(f"{url}/v1/models/{NAME}:predict", data=data, timeout=60,
                         headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}, **kwargs)


def decode(encoded: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))


@pytest.mark.parametrize("shape", [(1, 1), (5, 1), (3, 7), (64, 48), (256, 256)])
def test_png_encoding_reads_back_as_the_same_pixels_and_bytes_depend_on_pixels_only(shape):
    rng = np.random.default_rng(shape[0])
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    image[0] = np.arange(shape[1]) % 2 * 255  # left-neighbour differences that wrap around 256
    encoded = png_bytes(image)
    decoded = Image.open(io.BytesIO(encoded))
    assert (decoded.mode, decoded.size) == ("L", shape[::-1])
    assert np.array_equal(np.asarray(decoded), image)
    assert png_bytes(np.asfortranarray(image)) == encoded  # the same pixels laid out otherwise: the same file


def test_export_matches_torch_and_is_logged_on_the_version(registry):
    export = registry["export"]
    assert export["max_abs_diff"] <= 1e-4 and export["bytes"] > 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
        tags = mlflow.MlflowClient(registry["uri"]).get_model_version(NAME, "1").tags
        assert tags["onnx_artifact"] == export["artifact"]
        assert mlflow.artifacts.download_artifacts(export["artifact"], tracking_uri=registry["uri"]).endswith(".onnx")


def test_v1_predict_returns_the_generator_images_with_their_provenance(registry, server):
    response = predict(server, {"instances": [{"n": 3, "seed": 7, "label": "consolidation"}]})
    assert response.status_code == 200, response.text
    [prediction] = response.json()["predictions"]
    assert {k: prediction[k] for k in ("model_name", "model_version", "seed", "label", "format")} == \
        {"model_name": NAME, "model_version": "1", "seed": 7, "label": "consolidation", "format": "png"}
    assert prediction["condition"] == {"label": "consolidation"}
    images = np.stack([decode(image) for image in prediction["images"]])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
        expected = to_uint8(load_registered_generator(f"models:/{NAME}/1").sample(3, 7))
    assert images.shape == (3, 32, 32)
    # ONNX Runtime vs torch: parity ≤ 1e-4 can still flip a rounding to the next grey level
    assert np.abs(images.astype(int) - expected).max() <= 1


def test_same_seed_gives_identical_bytes_alone_or_batched_with_concurrent_requests(server):
    alone = {seed: predict(server, {"instances": [{"n": 3, "seed": seed}]}).json() for seed in range(6)}
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda s: predict(server, {"instances": [{"n": 3, "seed": s}]}).json(), range(6)))
    for seed, response in enumerate(together):
        assert response["predictions"][0]["images"] == alone[seed]["predictions"][0]["images"]
    assert alone[0]["predictions"][0]["images"] != alone[1]["predictions"][0]["images"]


def test_more_images_than_a_batch_are_split_and_keep_their_order(server):
    many = predict(server, {"instances": [{"n": MAX_BATCH * 2 + 1, "seed": 3}]}).json()["predictions"][0]["images"]
    few = predict(server, {"instances": [{"n": 2, "seed": 3}]}).json()["predictions"][0]["images"]
    assert len(many) == MAX_BATCH * 2 + 1 and many[:2] == few


def test_v2_infer_returns_a_uint8_tensor(server):
    body = {"inputs": [{"name": "n", "shape": [1], "datatype": "INT32", "data": [2]},
                       {"name": "seed", "shape": [1], "datatype": "INT64", "data": [7]},
                       {"name": "label", "shape": [1], "datatype": "BYTES", "data": ["consolidation"]}]}
    response = requests.post(f"{server}/v2/models/{NAME}/infer", json=body, timeout=60,
                             headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    result = response.json()
    [output] = result["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("images", "UINT8", [2, 32, 32])
    assert result["model_version"] == "1" and result["parameters"]["seed"] == 7
    v1 = predict(server, {"instances": [{"n": 2, "seed": 7}]}).json()["predictions"][0]["images"]
    assert np.array_equal(np.array(output["data"], dtype=np.uint8).reshape(2, 32, 32),
                          np.stack([decode(image) for image in v1]))


@pytest.mark.parametrize(("body", "field"), [
    (b"{not json", "Unrecognized request format"),
    ({"n": 2}, "instances"),
    ({"instances": []}, "instances"),
    ({"instances": [{"n": 0}]}, "instances[0].n"),
    ({"instances": [{"n": MAX_N + 1}]}, "instances[0].n"),
    ({"instances": [{"n": 2, "seed": "abc"}]}, "instances[0].seed"),
    ({"instances": [{"n": 2, "seed": 1.5}]}, "instances[0].seed"),
    ({"instances": [{"n": 2, "seed": -1}]}, "instances[0].seed"),
    ({"instances": [{"n": 2, "label": "normal"}]}, "instances[0].label"),
    ({"instances": [{"n": 2, "condition": {"mask": "x.png"}}]}, "instances[0].condition.mask"),
    ({"instances": [{"n": 2, "format": "jpeg"}]}, "instances[0].format"),
    ({"instances": [{"n": 2, "steps": 5}]}, "instances[0].steps"),
    ({"instances": [{"n": MAX_N}, {"n": 1}]}, "instances: 25 images"),
    ({"instances": [{"n": 1, "label": "x" * 3000}]}, "request body"),
])
def test_bad_requests_are_400_naming_the_field(server, body, field):
    response = predict(server, body)
    assert response.status_code == 400, response.text
    assert field in response.json()["error"]


@pytest.mark.parametrize(("content_type", "body", "status"), [
    ("application/x-www-form-urlencoded", '{"instances": [{"n": 1, "seed": 2}]}', 200),  # what curl -d sends
    ("text/plain", "n=1&seed=2", 400),
])
def test_bodies_of_other_content_types_are_read_as_json(server, content_type, body, status):
    response = requests.post(f"{server}/v1/models/{NAME}:predict", data=body, timeout=60,
                             headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": content_type})
    assert response.status_code == status, response.text
    if status == 400:
        assert "request body: not JSON" in response.json()["error"]


@pytest.mark.parametrize(("inputs", "field"), [
    ([{"name": "n", "shape": [1], "datatype": "FP32", "data": [2.0]}], "inputs.n"),
    ([{"name": "n", "shape": [1], "datatype": "INT32", "data": [1]},
      {"name": "condition", "shape": [1], "datatype": "BYTES", "data": ["{not json"]}], "inputs.condition"),
    ([{"name": "n", "shape": [1], "datatype": "INT32", "data": [1]},
      {"name": "condition", "shape": [1], "datatype": "BYTES", "data": ['{"size": [8, 8]}']}], "condition.size"),
])
def test_v2_bad_inputs_are_400(server, inputs, field):
    response = requests.post(f"{server}/v2/models/{NAME}/infer", json={"inputs": inputs},
                             headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 400 and field in response.json()["error"]


def test_bearer_token_is_required_except_on_health_probes(server):
    assert predict(server, {"instances": [{"n": 1}]}, token="wrong").status_code == 401
    assert requests.post(f"{server}/v1/models/{NAME}:predict", json={"instances": [{"n": 1}]}).status_code == 401
    assert requests.get(f"{server}/v2/health/ready").status_code == 200


def test_sample_command_writes_pngs_and_a_manifest_over_one_connection(server, tmp_path, monkeypatch):
    import urllib3.util.connection

    connections = []
    connect = urllib3.util.connection.create_connection
    monkeypatch.setattr(urllib3.util.connection, "create_connection",
                        lambda *args, **kwargs: connections.append(args[0]) or connect(*args, **kwargs))
    out = tmp_path / "samples"
    result = CliRunner().invoke(app, ["sample", "--url", server, "--model", NAME, "-n", "10", "--seed", "1",
                                      "--per-request", "4", "--out", str(out)], env={"SONOGEN_SERVE_TOKEN": TOKEN})
    assert result.exit_code == 0, result.output
    assert len(connections) == 1  # three requests, one keep-alive connection
    rows = list(__import__("csv").DictReader((out / "manifest.csv").open()))
    assert len(rows) == 10 and len(list(out.glob("*.png"))) == 10
    assert {r["model_version"] for r in rows} == {"1"} and {r["label"] for r in rows} == {"consolidation"}
    assert {r["boxes"] for r in rows} == {"[]"}  # a GAN places no lesions
    assert len({r["seed"] for r in rows}) == 3 and rows[0]["seed"] == "1"
    first = predict(server, {"instances": [{"n": 4, "seed": 1}]}).json()["predictions"][0]["images"]
    assert (out / "00000.png").read_bytes() == base64.b64decode(first[0])


def test_promotion_is_gated_audited_picked_up_by_a_watching_server_and_rolled_back(registry):
    runner = CliRunner()
    env = {"MLFLOW_TRACKING_URI": registry["uri"]}
    process, url = _start_server(registry, "--watch", "0.3")
    try:
        def served_version():
            response = predict(url, {"instances": [{"n": 1, "seed": 0}]})
            return response.status_code, response.json()["predictions"][0]["model_version"] if response.ok else None

        def wait_for(version):
            deadline = time.time() + 30
            while served_version() != (200, version):
                assert time.time() < deadline, f"the server did not pick up version {version}"
                time.sleep(0.2)

        assert served_version() == (503, None)  # no champion yet
        assert requests.get(f"{url}/v2/health/ready").status_code == 503  # and the probe says so

        refused = runner.invoke(app, ["registry", "promote", NAME, "2", "--to", "champion"], env=env)
        assert refused.exit_code == 1 and "gate 'not evaluated'" in refused.output
        no_reason = runner.invoke(app, ["registry", "promote", NAME, "2", "--force"], env=env)
        assert no_reason.exit_code == 1 and "--reason" in no_reason.output

        assert runner.invoke(app, ["registry", "promote", NAME, "1", "--reason", "first gated"], env=env).exit_code == 0
        wait_for("1")
        assert requests.get(f"{url}/v2/health/ready").status_code == 200
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
            audit = mlflow.MlflowClient(registry["uri"]).get_model_version(NAME, "1").tags
        again = runner.invoke(app, ["registry", "promote", NAME, "1", "--reason", "once more"], env=env)
        assert again.exit_code == 1 and "already @champion" in again.output
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
            assert mlflow.MlflowClient(registry["uri"]).get_model_version(NAME, "1").tags == audit, "the audit trail is kept"
        no_previous = runner.invoke(app, ["registry", "rollback", NAME], env=env)
        assert no_previous.exit_code == 1 and "no previous holder" in no_previous.output
        forced = runner.invoke(app, ["registry", "promote", NAME, "2", "--force", "--reason", "clinical review"],
                               env=env)
        assert forced.exit_code == 0 and "was version 1" in forced.output
        wait_for("2")  # v2 has no ONNX export: served by torch

        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
            tags = mlflow.MlflowClient(registry["uri"]).get_model_version(NAME, "2").tags
        assert (tags["champion.reason"], tags["champion.previous_version"], tags["champion.forced"]) == \
            ("clinical review", "1", "true")
        assert tags["champion.by"] and tags["champion.at"].endswith("Z")

        rolled = runner.invoke(app, ["registry", "rollback", NAME], env=env)
        assert rolled.exit_code == 0 and "version 1 (was version 2)" in rolled.output
        wait_for("1")
        again = runner.invoke(app, ["registry", "rollback", NAME], env=env)
        assert again.exit_code == 1 and "no previous holder" in again.output
    finally:
        stop_server(process)


def test_show_prints_the_model_card(registry):
    result = CliRunner().invoke(app, ["registry", "show", NAME, "--version", "1"],
                                env={"MLFLOW_TRACKING_URI": registry["uri"]})
    assert result.exit_code == 0, result.output
    for section in (f"# {NAME} v1", "## Data", "DVC md5", "licences", "## Training", "## Gates",
                    "## Intended use", "## Limitations", "Not for diagnosis"):
        assert section in result.output
    assert '"image_size": 32' in result.output


def test_serving_a_missing_model_without_watch_is_a_clear_error(registry):
    result = CliRunner().invoke(app, ["serve", "--model", "no-such-model"], env={"MLFLOW_TRACKING_URI": registry["uri"]})
    assert result.exit_code == 1 and "models:/no-such-model@champion does not exist" in result.output


def _generate(registry, out, n=10, batch=4, seed=3):
    return CliRunner().invoke(app, ["generate", "--model", f"models:/{NAME}/1", "-n", str(n), "--out", str(out),
                                    "--seed", str(seed), "--batch", str(batch)],
                              env={"MLFLOW_TRACKING_URI": registry["uri"]})


def test_generate_writes_a_dataset_resumes_and_refuses_other_settings(registry, server, tmp_path):
    from sonogen.data.manifest import read_manifest

    out = tmp_path / "synthetic"
    first = _generate(registry, out)
    assert first.exit_code == 0, first.output
    records = read_manifest(out)
    assert [r.image for r in records] == [f"images/{i:07d}.png" for i in range(10)]
    assert {(r.label, r.split, r.source) for r in records} == {("consolidation", "train", f"{NAME}@v1")}
    # chunk 0 is the endpoint's draw for the same seed
    served = predict(server, {"instances": [{"n": 4, "seed": 3}]}).json()["predictions"][0]["images"]
    assert [(out / r.image).read_bytes() for r in records[:4]] == [base64.b64decode(i) for i in served]

    lost = out / records[5].image
    original = lost.read_bytes()
    lost.unlink()
    again = _generate(registry, out)
    assert again.exit_code == 0 and "2 of 3 chunks were already there" in again.output
    assert lost.read_bytes() == original and read_manifest(out) == records

    other = _generate(registry, out, seed=4)
    assert other.exit_code == 1 and "other settings" in other.output


def test_generate_to_s3_resumes_from_what_is_there(registry, s3_server, aws_env, monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="synthetic-lus")
    assert _generate(registry, "s3://synthetic-lus/dcgan/v1", n=6).exit_code == 0
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="synthetic-lus")["Contents"]}
    assert keys == {"dcgan/v1/generate.json", "dcgan/v1/manifest.csv",
                    *(f"dcgan/v1/images/{i:07d}.png" for i in range(6))}
    s3.delete_object(Bucket="synthetic-lus", Key="dcgan/v1/images/0000005.png")
    resumed = _generate(registry, "s3://synthetic-lus/dcgan/v1", n=6)
    assert resumed.exit_code == 0 and "1 of 2 chunks were already there" in resumed.output
    assert s3.head_object(Bucket="synthetic-lus", Key="dcgan/v1/images/0000005.png")["ContentLength"] > 0


def test_export_command_reports_parity(registry):
    result = CliRunner().invoke(app, ["export", "onnx", f"models:/{NAME}/2"], env={"MLFLOW_TRACKING_URI": registry["uri"]})
    assert result.exit_code == 0, result.output
    assert "max |ONNX − torch|" in result.output and "runs:/" in result.output


def test_int8_export_is_gated_on_its_samples_batch_invariant_and_replaced_by_fp32(registry, monkeypatch):
    from sonogen.backends import load_backend

    monkeypatch.chdir(registry["root"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    version = register_trained(registry["root"] / "trained")["version"]
    uri = f"models:/{NAME}/{version}"
    export = CliRunner().invoke(app, ["export", "onnx", uri, "--precision", "int8", "--max-mmd-ratio", "0"])
    assert export.exit_code == 1 and "not logged" in export.output
    assert CliRunner().invoke(app, ["export", "onnx", uri, "--precision", "fp16"]).exit_code == 1
    export = CliRunner().invoke(app, ["export", "onnx", uri, "--precision", "int8"])
    assert export.exit_code == 0 and "ONNX int8" in export.output, export.output
    tags = mlflow.MlflowClient(registry["uri"]).get_model_version(NAME, version).tags
    assert tags["onnx_precision"] == "int8" and float(tags["onnx_mmd_ratio"]) <= 0.1
    backend = load_backend(uri)
    assert backend.runtime == "onnxruntime:CPUExecutionProvider:int8"
    images = backend.images(5, 7)
    # activation ranges are fixed at export, so an image does not depend on the batch it is drawn in
    assert np.array_equal(images[:2], backend.images(2, 7))
    assert np.abs(images.astype(int) - to_uint8(load_registered_generator(uri).sample(5, 7))).mean() < 2
    assert CliRunner().invoke(app, ["export", "onnx", uri]).exit_code == 0
    tags = mlflow.MlflowClient(registry["uri"]).get_model_version(NAME, version).tags
    assert tags["onnx_precision"] == "fp32" and "onnx_mmd_ratio" not in tags
    assert load_backend(uri).runtime == "onnxruntime:CPUExecutionProvider"


def test_register_exports_each_gan_for_the_slim_image_and_int8_falls_back_to_fp32_when_refused(registry, monkeypatch):
    import sonogen.export as export

    monkeypatch.chdir(registry["root"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    client = mlflow.MlflowClient(registry["uri"])
    result = CliRunner().invoke(app, ["register", "trained", "--onnx", "int8", "--report", "int8.json"])
    assert result.exit_code == 0, result.output
    [entry] = json.loads((registry["root"] / "int8.json").read_text())
    assert entry["onnx"]["precision"] == "int8"
    assert client.get_model_version(NAME, entry["version"]).tags["onnx_precision"] == "int8"
    from sonogen.generate import generate_dataset  # an int8 version generates at its own precision by default

    generate_dataset(f"models:/{NAME}/{entry['version']}", 2, str(registry["root"] / "int8-set"), batch=2)
    assert json.loads((registry["root"] / "int8-set" / "generate.json").read_text())["precision"] == "int8"
    exporting = export.export_registered  # an int8 gate no export passes
    monkeypatch.setattr(export, "export_registered", lambda uri, **kw: exporting(uri, **{**kw, "max_mmd_ratio": 0.0}))
    result = CliRunner().invoke(app, ["register", "trained", "--onnx", "int8", "--report", "refused.json"])
    assert result.exit_code == 0 and "int8 refused" in result.output, result.output
    [entry] = json.loads((registry["root"] / "refused.json").read_text())
    assert entry["onnx"]["precision"] == "fp32" and "not logged" in entry["onnx"]["int8_refused"]
    assert client.get_model_version(NAME, entry["version"]).tags["onnx_precision"] == "fp32"
    wrong = CliRunner().invoke(app, ["register", "trained", "--onnx", "fp16"])
    assert wrong.exit_code == 1 and "--onnx must be one of fp32, int8, none" in wrong.output


def test_the_serving_image_path_samples_an_exported_generator_without_torch(registry, server):
    """The serve image has no torch: resolving the champion's ONNX export and sampling must not need it."""
    script = (
        "import sys, json; sys.modules['torch'] = None\n"
        "import serving.__main__\n"
        "from sonogen.backends import load_backend\n"
        f"backend = load_backend('models:/{NAME}/1')\n"
        "print(json.dumps({'runtime': backend.runtime, 'images': backend.images(2, 7).tolist()}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "MLFLOW_TRACKING_URI": registry["uri"]}, cwd=registry["root"])
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["runtime"] == "onnxruntime:CPUExecutionProvider"
    served = predict(server, {"instances": [{"n": 2, "seed": 7}]}).json()["predictions"][0]["images"]
    assert np.array_equal(np.array(printed["images"], dtype=np.uint8), np.stack([decode(i) for i in served]))


def test_a_saved_generator_folder_is_served_by_torch(registry):
    from sonogen.generators import load_generator
    from sonogen.backends import load_backend

    folder = registry["root"] / "trained" / "generator"
    backend = load_backend(str(folder))
    assert (backend.runtime, backend.family, backend.label) == ("torch:cpu", "dcgan", "consolidation")
    assert np.array_equal(backend.images(3, 11), to_uint8(load_generator(folder).sample(3, 11)))


def test_the_image_entry_point_serves_with_a_token_from_its_environment_and_no_repository_routes(registry):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["uri"], "SONOGEN_SERVE_TOKEN": TOKEN}
    process = subprocess.Popen([sys.executable, "-m", "serving", "--model", NAME, "--version", "1", "--host",
                                "127.0.0.1", "--http_port", str(port)], env=env, cwd=registry["root"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if requests.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert process.poll() is None and time.time() < deadline, "python -m serving did not become ready"
            time.sleep(0.2)
        assert requests.post(f"{url}/v1/models/{NAME}:predict", json={"instances": [{"n": 1}]}).status_code == 401
        assert predict(url, {"instances": [{"n": 1, "seed": 2}]}).status_code == 200
        unload = requests.post(f"{url}/v2/repository/models/{NAME}/unload", headers={"Authorization": f"Bearer {TOKEN}"})
        assert unload.status_code == 404 and predict(url, {"instances": [{"n": 1}]}).status_code == 200
    finally:
        stop_server(process)


def test_the_image_entry_point_refuses_a_model_that_is_not_registered(registry):
    result = subprocess.run([sys.executable, "-m", "serving", "--model", "no-such-model"], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "MLFLOW_TRACKING_URI": registry["uri"]})
    assert result.returncode == 1
    assert "models:/no-such-model@champion does not exist in the registry" in result.stderr


def test_a_torch_family_draws_concurrent_requests_together_each_with_its_own_images(registry):
    process, url = _start_server(registry, "--version", "2", "--token", TOKEN, "--max-batch", "8")
    try:
        request = lambda seed: predict(url, {"instances": [{"n": 3, "seed": seed}]}).json()  # noqa: E731
        alone = {seed: request(seed) for seed in range(6)}
        with ThreadPoolExecutor(6) as pool:
            together = list(pool.map(request, range(6)))
    finally:
        stop_server(process)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
        generator = load_registered_generator(f"models:/{NAME}/2")
    for seed, response in enumerate(together):
        [prediction] = response["predictions"]
        assert prediction["model_version"] == "2" and prediction["images"] == alone[seed]["predictions"][0]["images"]
        images = np.stack([decode(image) for image in prediction["images"]])
        assert np.array_equal(images, to_uint8(generator.sample(3, seed)))
