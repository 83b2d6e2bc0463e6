"""What a busy or hostile client can do to the server: concurrent sampling, malformed and oversized payloads of
both protocols (a table of known cases and a property-based fuzz), closed kserve routes, bad credentials, and the
usual v2 client (tritonclient) on both of its paths. The server is a real `sonogen serve` process on loopback."""

import base64
import json
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from conftest import NAME, start_server, stop_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sonogen.generators.dcgan import DCGAN, DCGANConfig
from sonogen.jobs import register_trained
from sonogen.registry import load_registered_generator

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def torch_version(registry):
    """A version with no ONNX export: served by torch, whose networks are shared by the request threads."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(registry["root"])
        patch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
        return register_trained(registry["root"] / "trained", alias=None)["version"]


@pytest.fixture(scope="module")
def server(registry, torch_version):
    process, url = start_server(registry["root"], registry["uri"], NAME, "--version", torch_version, "--token", TOKEN,
                                "--max-n", "24", "--max-batch", "4", "--max-body-bytes", "200000")
    yield url
    stop_server(process)


@pytest.fixture(scope="module")
def http():
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        yield session


def v1(http, url, body, content_type="application/json"):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return http.post(f"{url}/v1/models/{NAME}:predict", data=data, headers={"Content-Type": content_type}, timeout=60)


def v2(http, url, body, headers=None, path="infer"):
    data = body if isinstance(body, bytes) else json.dumps(body)
    return http.post(f"{url}/v2/models/{NAME}/{path}", data=data, timeout=60,
                     headers={"Content-Type": "application/json", **(headers or {})})


def tensor(name, data, datatype="INT64", shape=(1,)):
    return {"name": name, "shape": list(shape), "datatype": datatype, "data": data}


def state(generator) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value.clone() for name, module in generator.networks().items()
            for key, value in module.state_dict().items()}


def test_sampling_from_many_threads_changes_no_weight_and_no_answer(registry, torch_version, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    generator = load_registered_generator(f"models:/{NAME}/{torch_version}")
    before, alone = state(generator), generator.sample(4, seed=123)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda k: generator.sample(4, seed=123 + k % 3), range(160)))
    assert all(torch.equal(value, state(generator)[key]) for key, value in before.items())
    assert torch.equal(generator.sample(4, seed=123), alone)
    assert all(torch.equal(answer, alone) for answer in answers[::3])


def test_a_generator_in_training_mode_samples_from_threads_without_learning():
    torch.manual_seed(0)
    generator = DCGAN(DCGANConfig(label="consolidation", image_size=32, base_channels=4))  # networks in train mode
    before = state(generator)
    alone = generator.sample(3, seed=5)
    barrier = threading.Barrier(6)

    def draw(_):
        barrier.wait()
        return generator.sample(3, seed=5)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(draw, range(6)))
    assert all(torch.equal(value, state(generator)[key]) for key, value in before.items())
    assert all(torch.equal(answer, alone) for answer in answers)
    assert all(module.training for module in generator.networks().values()), "the training mode is given back"


def test_a_busy_server_keeps_answering_each_seed_as_it_did_alone(server, http):
    alone = {seed: v1(http, server, {"instances": [{"n": 3, "seed": seed}]}).json() for seed in range(4)}
    with ThreadPoolExecutor(16) as pool:
        busy = list(pool.map(lambda k: v1(http, server, {"instances": [{"n": 1 + k % 5, "seed": k % 4}]}), range(96)))
    assert all(response.status_code == 200 for response in busy)
    for seed in range(4):
        again = v1(http, server, {"instances": [{"n": 3, "seed": seed}]}).json()
        assert again["predictions"][0]["images"] == alone[seed]["predictions"][0]["images"]


@pytest.mark.parametrize(("method", "path"), [
    ("POST", f"/v2/repository/models/{NAME}/unload"),
    ("POST", f"/v2/repository/models/{NAME}/load"),
    ("POST", f"/v1/models/{NAME}:explain"),
    ("POST", f"/v2/models/{NAME}/versions/999/infer"),
    ("GET", f"/v2/models/{NAME}/versions/1"),
])
def test_routes_that_could_switch_the_model_off_are_not_served(server, http, method, path):
    response = http.request(method, f"{server}{path}", json={"inputs": []}, timeout=30)
    assert response.status_code == 404, response.text
    assert requests.get(f"{server}/v2/health/ready", timeout=30).status_code == 200
    assert v1(http, server, {"instances": [{"n": 1, "seed": 0}]}).status_code == 200


@pytest.mark.parametrize("authorization", ["Bearer s3crét".encode("latin-1"), b"Bearer \xff\xfe", b"", b"Bearer"])
def test_a_bad_authorization_header_is_401(server, authorization):
    response = requests.post(f"{server}/v1/models/{NAME}:predict", data=b'{"instances": [{"n": 1}]}', timeout=30,
                             headers={"Authorization": authorization, "Content-Type": "application/json"})
    assert response.status_code == 401, response.text


def binary_body(inputs: list[tuple[dict, bytes]], extra: dict | None = None) -> tuple[bytes, dict]:
    """The binary tensor extension: a JSON header (its length in a header) followed by the tensors' bytes."""
    header = json.dumps({"inputs": [spec for spec, _ in inputs], **(extra or {})}).encode()
    return header + b"".join(raw for _, raw in inputs), {"Inference-Header-Content-Length": str(len(header))}


def binary_bytes(name: str, value: bytes, size: int | None = None) -> tuple[dict, bytes]:
    raw = struct.pack("<I", len(value)) + value
    return {"name": name, "shape": [1], "datatype": "BYTES",
            "parameters": {"binary_data_size": len(raw) if size is None else size}}, raw


def binary_int(name: str, value: int, size: int = 8) -> tuple[dict, bytes]:
    return {"name": name, "shape": [1], "datatype": "INT64", "parameters": {"binary_data_size": size}}, \
        struct.pack("<q", value)


DEEP_CONDITION = "[" * 5000 + "]" * 5000
MALFORMED_V2 = [
    ({"inputs": [tensor("n", [])]}, "inputs.n"),
    ({"inputs": [tensor("n", [1]), tensor("label", [], "BYTES")]}, "inputs.label"),
    ({"inputs": [tensor("n", [1, 2])]}, "inputs.n"),
    ({"inputs": [tensor("n", [1]), tensor("n", [2])]}, "inputs.n: given twice"),
    ({"inputs": [tensor("n", [[1]])]}, "inputs.n"),
    ({"inputs": [tensor("n", [1]), tensor("condition", [DEEP_CONDITION], "BYTES")]}, "inputs.condition"),
    ({"inputs": [tensor("n", [1])], "outputs": [{"name": "logits"}]}, "outputs[0].name"),
    ({"inputs": [tensor("n", [1])], "outputs": [{"name": "images", "parameters": {"binary_data": "yes"}}]},
     "outputs[0].parameters.binary_data"),
    ({"inputs": [tensor("n", [1])], "parameters": {"binary_data_output": "x"}}, "parameters.binary_data_output"),
]


@pytest.mark.parametrize(("body", "field"), MALFORMED_V2)
def test_malformed_v2_json_requests_are_400_naming_the_field(server, http, body, field):
    response = v2(http, server, body)
    assert response.status_code == 400, response.text
    assert field in response.json()["error"]


def test_deeply_nested_v1_bodies_are_400_whatever_their_content_type(server, http):
    deep = "[" * 30000 + "]" * 30000
    for content_type in ("text/plain", "application/json", "application/x-www-form-urlencoded"):
        response = v1(http, server, deep, content_type)
        assert 400 <= response.status_code < 500, (content_type, response.status_code, response.text)
    nested = {"instances": [{"n": 1, "condition": {"label": json.loads("[" * 50 + "]" * 50)}}]}
    response = v1(http, server, nested)
    assert response.status_code == 400 and "nested deeper" in response.json()["error"]


@pytest.mark.parametrize(("make", "field"), [
    (lambda: (binary_body([binary_int("n", 1)])[0], {"Inference-Header-Content-Length": "abc"}),
     "inference-header-content-length"),
    (lambda: (binary_body([binary_int("n", 1)])[0], {"Inference-Header-Content-Length": "99999"}),
     "inference-header-content-length"),
    (lambda: binary_body([binary_int("n", 1, size=64)]), "inputs.n: binary_data_size 64"),
    (lambda: (binary_body([binary_int("n", 1)])[0] + b"tail", binary_body([binary_int("n", 1)])[1]), "request body"),
    (lambda: binary_body([binary_int("n", 1), binary_bytes("label", b"\xff\xfe\xfd")]), "inputs.label"),
    (lambda: binary_body([binary_int("n", 1), binary_bytes("condition", b'{"label": "\xff"}')]), "inputs.condition"),
    (lambda: binary_body([binary_int("n", 1), binary_bytes("label", b"x" * 4, size=400)]), "inputs.label"),
])
def test_malformed_binary_requests_are_400_naming_the_field(server, http, make, field):
    body, headers = make()
    response = v2(http, server, body, {**headers, "Content-Type": "application/octet-stream"})
    assert response.status_code == 400, response.text
    assert field in response.json()["error"]


def test_a_well_formed_binary_request_answers_like_json(server, http):
    body, headers = binary_body([binary_int("n", 2), binary_int("seed", 7), binary_bytes("label", b"consolidation")])
    binary = v2(http, server, body, {**headers, "Content-Type": "application/octet-stream"})
    assert binary.status_code == 200, binary.text
    plain = v2(http, server, {"inputs": [tensor("n", [2]), tensor("seed", [7])]})
    assert binary.json()["outputs"] == plain.json()["outputs"]


def test_tritonclient_json_and_binary_paths_and_the_tensor_metadata(server):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(server.removeprefix("http://"))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert client.is_server_ready() and client.is_model_ready(NAME, headers=headers)
    metadata = client.get_model_metadata(NAME, headers=headers)
    assert {(t["name"], t["datatype"]) for t in metadata["inputs"]} == {
        ("n", "INT64"), ("seed", "INT64"), ("label", "BYTES"), ("condition", "BYTES"), ("precision", "BYTES")}
    assert all(t["shape"] == [1] for t in metadata["inputs"])
    assert [(t["name"], t["datatype"], len(t["shape"])) for t in metadata["outputs"]] == [("images", "UINT8", 3)]

    results = {}
    for binary in (False, True):
        inputs = []
        for name, value in (("n", np.array([3], np.int64)), ("seed", np.array([11], np.int64)),
                            ("label", np.array([b"consolidation"], np.object_))):
            inputs.append(triton.InferInput(name, [1], "BYTES" if value.dtype == object else "INT64"))
            inputs[-1].set_data_from_numpy(value, binary_data=binary)
        outputs = [triton.InferRequestedOutput("images", binary_data=binary)]
        result = client.infer(NAME, inputs, outputs=outputs, headers=headers)
        results[binary] = result.as_numpy("images")
    assert results[False].shape == (3, 32, 32) and results[False].dtype == np.uint8
    assert np.array_equal(results[False], results[True])
    client.close()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=30,
)
V1_FIELDS = st.sampled_from(["n", "seed", "label", "condition", "format", "steps", "mask"])
V1_BODIES = st.one_of(
    JSON_VALUES,
    st.fixed_dictionaries({"instances": st.lists(st.dictionaries(V1_FIELDS, JSON_VALUES, max_size=5), max_size=3)}),
)
V2_TENSORS = st.fixed_dictionaries({
    "name": st.sampled_from(["n", "seed", "label", "condition", "other"]),
    "shape": st.lists(st.integers(-2, 3), max_size=3),
    "datatype": st.sampled_from(["INT64", "INT32", "UINT8", "BYTES", "FP32", "BOOL", "??"]),
    "data": JSON_VALUES,
}, optional={"parameters": st.dictionaries(st.sampled_from(["binary_data_size", "x"]), JSON_VALUES, max_size=2)})
V2_BODIES = st.one_of(
    JSON_VALUES,
    st.fixed_dictionaries({"inputs": st.lists(V2_TENSORS, max_size=4)},
                          optional={"outputs": st.lists(st.dictionaries(st.sampled_from(["name", "parameters"]),
                                                                        JSON_VALUES), max_size=2),
                                    "parameters": st.dictionaries(st.text(max_size=20), JSON_VALUES, max_size=2),
                                    "id": JSON_VALUES}),
)
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def assert_client_error_or_success(response):
    assert response.status_code < 500, (response.status_code, response.text[:300])


@FUZZ
@given(body=V1_BODIES, raw=st.binary(max_size=200), as_bytes=st.booleans(),
       content_type=st.sampled_from(["application/json", "text/plain", "application/octet-stream", ""]))
def test_fuzz_v1_never_answers_5xx(server, http, body, raw, as_bytes, content_type):
    data = raw if as_bytes else json.dumps(body)
    assert_client_error_or_success(v1(http, server, data, content_type))


@FUZZ
@given(body=V2_BODIES, raw=st.binary(max_size=200), mode=st.sampled_from(["json", "bytes", "binary"]),
       json_length=st.one_of(st.none(), st.integers(-5, 400), st.from_regex(r"[ -~]{0,5}", fullmatch=True)))
def test_fuzz_v2_never_answers_5xx(server, http, body, raw, mode, json_length):
    headers = {}
    if mode == "json":
        data = json.dumps(body).encode()
    elif mode == "bytes":
        data, headers = raw, {"Content-Type": "application/octet-stream"}
    else:  # a JSON header with raw bytes after it, and a length header that may lie
        data = json.dumps(body).encode() + raw
        headers = {"Content-Type": "application/octet-stream"}
        if json_length is not None:
            headers["Inference-Header-Content-Length"] = str(json_length)
    assert_client_error_or_success(v2(http, server, data, headers))


def test_after_the_fuzz_the_server_still_answers_and_is_ready(server, http):
    assert requests.get(f"{server}/v2/health/ready", timeout=30).status_code == 200
    response = v2(http, server, {"inputs": [tensor("n", [2]), tensor("seed", [3])]})
    assert response.status_code == 200 and response.json()["outputs"][0]["shape"] == [2, 32, 32]
    encoded = v1(http, server, {"instances": [{"n": 1, "seed": 3}]}).json()["predictions"][0]["images"][0]
    assert base64.b64decode(encoded).startswith(b"\x89PNG")
