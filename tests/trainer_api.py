"""A loopback stand-in for the part of the Kubernetes API the Kubeflow SDK's TrainerClient uses, for tests: it serves
sonogen's TrainingRuntime from infra/trainer, checks every TrainJob it receives against the Trainer API models
(``kubeflow_trainer_api``), and either scripts the job's outcome and log or runs its command here, as the single
node of the job (torchrun reads the PET_* variables Kubeflow Trainer would set)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import yaml

API = "/apis/trainer.kubeflow.org/v1alpha1"
RUNTIME = Path(__file__).resolve().parents[1] / "infra" / "trainer" / "runtime.yaml"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrainerApi:
    """``outcome``: "Complete" or "Failed" after ``ticks`` reads of a job, with ``log`` as its log; or "run": the
    job's command runs here with ``processes`` ranks and the job ends as it exits."""

    def __init__(self, outcome: str = "Complete", ticks: int = 2, log: tuple[str, ...] = (), processes: int = 2,
                 workdir: Path | None = None):
        self.outcome, self.ticks, self.log, self.processes, self.workdir = outcome, ticks, log, processes, workdir
        self.runtime = yaml.safe_load(RUNTIME.read_text())
        self.received: list[dict] = []
        self.invalid: list[str] = []  # why a received TrainJob failed the API models
        self.jobs: dict[str, dict] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        for job in self.jobs.values():
            if job.get("process") and job["process"].poll() is None:
                job["process"].kill()
        self.server.shutdown()
        self.server.server_close()

    def client(self, namespace: str = "kubeflow"):
        from kubernetes.client import Configuration
        from kubeflow.trainer import KubernetesBackendConfig, TrainerClient

        configuration = Configuration()
        configuration.host, configuration.proxy = self.url, None
        return TrainerClient(KubernetesBackendConfig(namespace=namespace, client_configuration=configuration))

    # the jobs ------------------------------------------------------------------------------------------------

    def _accept(self, namespace: str, body: dict) -> dict:
        from kubeflow_trainer_api import models

        self.received.append(json.loads(json.dumps(body)))
        try:  # the models drop fields they do not know: a round trip shows them
            if models.TrainerV1alpha1TrainJob.from_dict(body).to_dict() != body:
                self.invalid.append("fields the Trainer API does not know")
        except Exception as err:  # noqa: BLE001  (pydantic's ValidationError, reported by the test)
            self.invalid.append(str(err))
        body["metadata"].update(namespace=namespace, creationTimestamp=_now())
        job = {"body": body, "reads": 0, "log": list(self.log), "process": None}
        if self.outcome == "run":
            job["process"], job["output"] = self._run(body)
        self.jobs[body["metadata"]["name"]] = job
        return body

    def _run(self, body: dict) -> tuple[subprocess.Popen, Path]:
        trainer = body["spec"]["trainer"]
        assert trainer.get("numNodes", 1) == 1, "the stand-in runs one node"
        output = (self.workdir or Path.cwd()) / f"{body['metadata']['name']}.log"
        env = {**os.environ, "PET_NNODES": "1", "PET_NPROC_PER_NODE": str(self.processes), "PET_NODE_RANK": "0",
               "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(_free_port()),
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        with output.open("w") as log:
            process = subprocess.Popen(trainer["command"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                       cwd=self.workdir)
        return process, output

    def _state(self, job: dict) -> str:
        if job["process"] is not None:
            code = job["process"].poll()
            return "Running" if code is None else "Complete" if code == 0 else "Failed"
        return self.outcome if job["reads"] >= self.ticks else "Running"

    def _view(self, name: str) -> dict:
        job = self.jobs[name]
        job["reads"] += 1
        view = json.loads(json.dumps(job["body"]))
        if (state := self._state(job)) != "Running":
            view["status"] = {"conditions": [{"type": state, "status": "True", "lastTransitionTime": _now(),
                                              "reason": state, "message": f"job {state.lower()}"}]}
        return view

    def _pods(self, name: str) -> list[dict]:
        job = self.jobs[name]
        phase = {"Running": "Running", "Complete": "Succeeded", "Failed": "Failed"}[self._state(job)]
        return [{"metadata": {"name": f"{name}-node-0-{k}-x", "namespace": job["body"]["metadata"]["namespace"],
                              "labels": {"jobset.sigs.k8s.io/jobset-name": name,
                                         "jobset.sigs.k8s.io/replicatedjob-name": "node",
                                         "batch.kubernetes.io/job-completion-index": str(k)}},
                 "spec": {"containers": [{"name": "node", "image": job["body"]["spec"]["trainer"]["image"]}]},
                 "status": {"phase": phase}} for k in range(job["body"]["spec"]["trainer"].get("numNodes", 1))]

    def _log_lines(self, name: str, follow: bool):
        job = self.jobs[name]
        if job["process"] is None:
            yield from job["log"]
            return
        with open(job["output"]) as output:
            while True:
                line = output.readline()
                if line:
                    yield line.rstrip("\n")
                elif follow and job["process"].poll() is None:
                    time.sleep(0.1)
                else:
                    yield from (rest.rstrip("\n") for rest in output.readlines())
                    return

    # HTTP ------------------------------------------------------------------------------------------------------

    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _missing(self) -> None:
                self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                                 "code": 404, "message": f"{self.path} not found"})

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                path, query = url.path, parse_qs(url.query)
                size = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(size)) if size else None
                meta = api.runtime["metadata"]
                if match := re.fullmatch(API + r"/namespaces/([^/]+)/trainingruntimes/([^/]+)", path):
                    if (match[1], match[2]) == (meta["namespace"], meta["name"]):
                        return self._send(200, api.runtime)
                elif match := re.fullmatch(API + r"/namespaces/([^/]+)/trainjobs(?:/([^/]+))?", path):
                    if method == "POST":
                        return self._send(201, api._accept(match[1], body))
                    if match[2] in api.jobs and method == "DELETE":
                        api.jobs.pop(match[2])
                        return self._send(200, {"kind": "Status", "status": "Success"})
                    if match[2] in api.jobs:
                        return self._send(200, api._view(match[2]))
                elif re.fullmatch(r"/api/v1/namespaces/[^/]+/pods", path):
                    name = re.search(r"jobset-name=([^,]+)", query.get("labelSelector", [""])[0])
                    items = api._pods(name[1]) if name and name[1] in api.jobs else []
                    return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
                elif match := re.fullmatch(r"/api/v1/namespaces/[^/]+/pods/(.+)-node-0-\d+-x/log", path):
                    if match[1] in api.jobs:
                        self.send_response(200)
                        self.send_header("Content-Type", "text/plain")
                        self.end_headers()  # no length: the stream ends when the connection closes
                        follow = query.get("follow", [""])[0].lower() == "true"
                        for line in api._log_lines(match[1], follow):
                            self.wfile.write(f"{line}\n".encode())
                            self.wfile.flush()
                        return
                self._missing()

            def do_GET(self):  # noqa: N802
                self._route("GET")

            def do_POST(self):  # noqa: N802
                self._route("POST")

            def do_DELETE(self):  # noqa: N802
                self._route("DELETE")

        return Handler
