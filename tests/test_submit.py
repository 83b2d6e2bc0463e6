"""Cluster submission through the real ``kfp.Client`` against a KFP v2beta1 REST server on loopback that keeps
pipelines, versions, experiments and runs in memory and records every call."""

import json
import threading
import uuid
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
import yaml
from typer.testing import CliRunner

from pipelines.training import PIPELINE_NAME, arguments_from_params, compile_pipeline
from sonogen.cli import app
from sonogen.submit import submit_pipeline

from test_pipeline import TINY_PARAMS

API = "/apis/v2beta1"


class KfpApiServer(ThreadingHTTPServer):
    """The subset of the KFP API that ``kfp.Client`` uses to upload, version, file and run a pipeline."""

    def __init__(self, final_state: str = "SUCCEEDED", required_token: str | None = None):
        super().__init__(("127.0.0.1", 0), KfpApiHandler)
        self.final_state = final_state
        self.required_token = required_token
        self.calls: list[dict] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def _matches(item: dict, query: dict) -> bool:
    if "filter" not in query:
        return True
    [predicate] = json.loads(query["filter"][0])["predicates"]
    return item["display_name"] == predicate["stringValue"]


class KfpApiHandler(BaseHTTPRequestHandler):
    server: KfpApiServer

    def log_message(self, *args):
        pass

    def _reply(self, body: dict, status: int = 200):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self, body=None):
        url = urlparse(self.path)
        call = {"method": self.command, "path": url.path, "query": parse_qs(url.query), "body": body,
                "authorization": self.headers.get("Authorization")}
        self.server.calls.append(call)
        return call

    def _unauthorised(self) -> bool:
        """Like a KFP behind an auth proxy that leaves the health check open."""
        expected = self.server.required_token
        if expected is None or urlparse(self.path).path == f"{API}/healthz" \
                or self.headers.get("Authorization") == f"Bearer {expected}":
            return False
        self._reply({"error": "missing or invalid bearer token"}, 401)
        return True

    def _uploaded_file(self) -> str:
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        message = BytesParser(policy=HTTP).parsebytes(
            f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + raw)
        [part] = [p for p in message.iter_parts() if p.get_param("name", header="content-disposition") == "uploadfile"]
        return part.get_payload(decode=True).decode()

    def do_GET(self):
        if self._unauthorised():
            return
        call, server = self._record(), self.server
        path, query = call["path"], call["query"]
        if path == f"{API}/healthz":
            return self._reply({"multi_user": False})
        if path == f"{API}/pipelines":
            return self._reply({"pipelines": [p for p in server.pipelines.values() if _matches(p, query)]})
        if path.startswith(f"{API}/pipelines/") and path.endswith("/versions"):
            pipeline_id = path.split("/")[-2]
            return self._reply({"pipeline_versions": [v for v in server.versions.values()
                                                      if v["pipeline_id"] == pipeline_id and _matches(v, query)]})
        if path == f"{API}/experiments":
            return self._reply({"experiments": [e for e in server.experiments.values() if _matches(e, query)]})
        if path.startswith(f"{API}/runs/"):
            run = server.runs[path.rsplit("/", 1)[1]]
            run["state"] = server.final_state
            return self._reply(run)
        self._reply({"error": f"no route {path}"}, 404)

    def do_POST(self):
        if self._unauthorised():
            return
        server, path = self.server, urlparse(self.path).path
        if path in (f"{API}/pipelines/upload", f"{API}/pipelines/upload_version"):
            call = self._record(self._uploaded_file())
            name = call["query"]["name"][0]
            if path.endswith("upload"):
                pipeline = {"pipeline_id": str(uuid.uuid4()), "display_name": name}
                server.pipelines[pipeline["pipeline_id"]] = pipeline
                return self._reply(pipeline)
            version = {"pipeline_version_id": str(uuid.uuid4()), "display_name": name,
                       "pipeline_id": call["query"]["pipelineid"][0]}
            server.versions[version["pipeline_version_id"]] = version
            return self._reply(version)
        call = self._record(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        if path == f"{API}/experiments":
            experiment = {**call["body"], "experiment_id": str(uuid.uuid4())}
            server.experiments[experiment["experiment_id"]] = experiment
            return self._reply(experiment)
        if path == f"{API}/runs":
            run = {**call["body"], "run_id": str(uuid.uuid4()), "state": "PENDING"}
            server.runs[run["run_id"]] = run
            return self._reply(run)
        self._reply({"error": f"no route {path}"}, 404)


@pytest.fixture
def kfp_server(request):
    server = KfpApiServer(**getattr(request, "param", {}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def package(tmp_path):
    return compile_pipeline(tmp_path / "training_pipeline.yaml")


def _calls(server, method, path):
    return [c for c in server.calls if c["method"] == method and c["path"] == f"{API}{path}"]


def test_submission_uploads_a_versioned_pipeline_and_starts_a_run_with_the_arguments(kfp_server, package):
    arguments = arguments_from_params(yaml.safe_dump(TINY_PARAMS))
    result = submit_pipeline(package, kfp_server.url, arguments, experiment="lus-nightly", token="secret-token")

    [upload] = _calls(kfp_server, "POST", "/pipelines/upload")
    assert upload["query"]["name"] == [PIPELINE_NAME]
    assert list(yaml.safe_load_all(upload["body"])) == list(yaml.safe_load_all(package.read_text()))
    [version] = _calls(kfp_server, "POST", "/pipelines/upload_version")
    assert version["query"]["pipelineid"] == [result["pipeline_id"]]
    assert list(yaml.safe_load_all(version["body"])) == list(yaml.safe_load_all(package.read_text()))
    [experiment] = _calls(kfp_server, "POST", "/experiments")
    assert experiment["body"]["display_name"] == "lus-nightly"

    [created] = _calls(kfp_server, "POST", "/runs")
    run = created["body"]
    assert run["experiment_id"] == result["experiment_id"]
    assert run["pipeline_version_reference"] == {"pipeline_id": result["pipeline_id"],
                                                 "pipeline_version_id": result["version_id"]}
    assert run["runtime_config"]["parameters"] == arguments
    assert yaml.safe_load(run["runtime_config"]["parameters"]["params"]) == TINY_PARAMS
    assert run["service_account"] == "sonogen-pipeline-runner"
    assert "pipeline_spec" not in run  # the run pins the uploaded version, not an inline copy
    assert {c["authorization"] for c in kfp_server.calls} == {"Bearer secret-token"}
    assert result["run_url"] == f"{kfp_server.url}/#/runs/details/{result['run_id']}"
    assert result["state"] == "PENDING"


def test_resubmitting_the_same_package_reuses_its_version_and_experiment(kfp_server, package, tmp_path):
    arguments = arguments_from_params(yaml.safe_dump(TINY_PARAMS))
    first = submit_pipeline(package, kfp_server.url, arguments)
    second = submit_pipeline(package, kfp_server.url, arguments)
    assert (second["pipeline_id"], second["version_id"], second["experiment_id"]) == \
        (first["pipeline_id"], first["version_id"], first["experiment_id"])
    assert second["run_id"] != first["run_id"]
    assert len(_calls(kfp_server, "POST", "/pipelines/upload")) == 1
    assert len(_calls(kfp_server, "POST", "/pipelines/upload_version")) == 1

    changed = tmp_path / "changed.yaml"
    changed.write_text(package.read_text().replace("Train, gate and register", "Train, gate, register"))
    third = submit_pipeline(changed, kfp_server.url, arguments)
    assert third["pipeline_id"] == first["pipeline_id"] and third["version_id"] != first["version_id"]


@pytest.mark.parametrize(("kfp_server", "exit_code"), [({"final_state": "SUCCEEDED"}, 0), ({"final_state": "FAILED"}, 1)],
                         indirect=["kfp_server"])
def test_cli_submits_with_host_and_wait_exits_with_the_run_outcome(kfp_server, exit_code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    result = CliRunner().invoke(app, ["pipeline", "run", "--host", kfp_server.url, "--wait", "--raw", "data/raw/mine",
                                      "--dvc-repo", "https://example.org/lus-data.git",
                                      "--service-account", "default-editor"],
                                env={"KFP_TOKEN": "from-env"})
    assert result.exit_code == exit_code, result.output
    [created] = _calls(kfp_server, "POST", "/runs")
    [run_id] = kfp_server.runs
    assert f"submitted run {run_id}" in result.output
    parameters = created["body"]["runtime_config"]["parameters"]
    assert (parameters["raw"], parameters["dvc_repo"]) == ("data/raw/mine", "https://example.org/lus-data.git")
    assert created["body"]["service_account"] == "default-editor"
    assert f"run finished: {kfp_server.final_state}" in result.output
    assert kfp_server.calls[-1]["authorization"] == "Bearer from-env"
    assert not (tmp_path / ".kfp").exists()  # nothing ran locally


def test_unreachable_host_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    result = CliRunner().invoke(app, ["pipeline", "run", "--host", "http://127.0.0.1:9"])
    assert result.exit_code == 1
    assert "cannot reach Kubeflow Pipelines at http://127.0.0.1:9" in " ".join(result.output.split())


@pytest.mark.parametrize("kfp_server", [{"required_token": "right"}], indirect=True)
def test_rejected_token_is_a_clear_error_that_names_the_fix(kfp_server, package):
    with pytest.raises(ConnectionError, match=r"HTTP 401.*--token or set KFP_TOKEN"):
        submit_pipeline(package, kfp_server.url, {"params": "{}"}, token="wrong")
    assert not kfp_server.pipelines and not kfp_server.runs
