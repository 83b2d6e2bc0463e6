"""The HTTP side: kserve's REST application (its dataplane, v1 and v2 protocols) behind request limits and an
optional bearer token, run with uvicorn on the host we choose; and an alias watcher that reloads on promotion."""

from __future__ import annotations

import hmac
import json
import logging
import re
import threading
from pathlib import Path

from serving.predictor import SamplerModel

logger = logging.getLogger("sonogen.serving")
MAX_BODY_BYTES = 64 * 1024
# probes stay open: on a cluster the kubelet calls them without credentials
OPEN_PATHS = ("/", "/v2/health/live", "/v2/health/ready")
# kserve routes this server does not offer: the model repository extension (anyone could unload the model while
# readiness still said ready), explanations, and addressing versions (one server serves one version)
CLOSED_ROUTES = re.compile(r"^/v2/repository/|/versions/|:explain$")
INFER_PATH = re.compile(r"^/v2/models/[^/]+/infer$")
JSON_LENGTH_HEADER = b"inference-header-content-length"


class RequestGuard:
    """ASGI middleware in front of kserve's application: the routes it does not offer are 404, a body over
    ``max_body_bytes`` is a 400 before any of it is parsed, a malformed binary-extension header is a 400, and with
    a ``token`` every path but the probes needs ``Authorization: Bearer <token>``."""

    def __init__(self, app, max_body_bytes: int = MAX_BODY_BYTES, token: str | None = None):
        self.app, self.max_body_bytes, self.token = app, max_body_bytes, token

    @staticmethod
    async def _reject(send, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        expected = f"Bearer {self.token}".encode()
        return hmac.compare_digest(headers.get(b"authorization", b""), expected)  # bytes: any header compares

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token and scope["path"] not in OPEN_PATHS and not self._authorised(headers):
            return await self._reject(send, 401, "missing or invalid bearer token")
        if CLOSED_ROUTES.search(scope["path"]):
            return await self._reject(send, 404, f"{scope['path']}: not served here (one model version, no "
                                                 "repository or explainer routes)")
        too_large = f"request body: larger than {self.max_body_bytes} bytes"
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            return await self._reject(send, 400, "content-length: expected a number of bytes")
        if declared > self.max_body_bytes:
            return await self._reject(send, 400, too_large)
        body, more = b"", True
        while more:  # chunked bodies are counted as they arrive
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await self._reject(send, 400, too_large)
        if INFER_PATH.match(scope["path"]):
            problem = _binary_header_problem(headers, len(body))
            if problem:
                return await self._reject(send, 400, problem)
            if JSON_LENGTH_HEADER not in headers and b"content-type" not in headers:
                # the v2 protocol's JSON body needs no content type (tritonclient sends none); kserve reads a body
                # without one as the binary extension, which needs the JSON length header
                scope = {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def _binary_header_problem(headers: dict[bytes, bytes], body_bytes: int) -> str | None:
    """What is wrong with the binary extension's JSON length header, if it is there."""
    value = headers.get(JSON_LENGTH_HEADER)
    if value is None:
        return None
    if not value.isdigit() or not 0 < int(value) <= body_bytes:
        return (f"inference-header-content-length: expected the length in bytes of the JSON part of the "
                f"{body_bytes}-byte body, got {value.decode(errors='replace')!r}")
    return None


def _check_binary_tensors(body: bytes, json_length: int) -> None:
    """The binary extension's tensors must fill exactly the bytes after the JSON part, and BYTES tensors (each
    element a 4-byte little-endian length and its bytes) must hold UTF-8 text: kserve would fail on either with a
    message that names no input."""
    from kserve.errors import InvalidInput

    header = json.loads(body[:json_length])
    offset = json_length
    for tensor in header.get("inputs") or []:
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is None:
            continue
        name = f"inputs.{tensor.get('name')}"
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidInput(f"{name}: binary_data_size must be a number of bytes")
        data, offset = body[offset:offset + size], offset + size
        if len(data) < size:
            raise InvalidInput(f"{name}: binary_data_size {size}, but the body ends {size - len(data)} bytes short")
        while tensor.get("datatype") == "BYTES" and data:
            length = int.from_bytes(data[:4], "little")
            try:
                data[4:4 + length].decode()
            except UnicodeDecodeError:
                raise InvalidInput(f"{name}: expected UTF-8 text") from None
            data = data[4 + length:]
    if offset != len(body):
        raise InvalidInput(f"request body: {len(body) - offset} bytes after the tensors they declare")


def _first_problem(errors: list[dict]) -> str:
    """A request-model validation error as ``field.path: message`` (the v2 JSON model's first complaint)."""
    for error in errors:
        where = [str(part) for part in error.get("loc", ()) if part not in ("body", "InferenceRequest")]
        if where and where[0] != "bytes":
            path = "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in where).lstrip(".")
            return f"{path}: {error.get('msg', 'invalid')}"
    return "request body: not an inference request"


def model_uri(model: str, alias: str = "champion", version: str | None = None) -> str:
    """``models:/NAME@ALIAS`` (or ``/VERSION``) for a registered name; URIs and folders are kept as they are."""
    if model.startswith("models:/") or "://" in model or Path(model).exists():
        return model
    return f"models:/{model}/{version}" if version else f"models:/{model}@{alias}"


def watch_alias(model: SamplerModel, every_s: float) -> threading.Thread:
    """Polls the registry and reloads ``model`` when its alias points at another version (or first appears)."""
    from sonogen.registry import resolve_version

    def poll():
        stop = threading.Event()
        while not stop.wait(every_s):
            try:
                _, version = resolve_version(model.model_uri)
                if version != model.version:
                    logger.info("%s now points at version %s: reloading", model.model_uri, version)
                    model.load()
            except Exception:  # a registry hiccup must not stop the watcher; the next poll retries
                logger.exception("watching %s failed", model.model_uri)

    thread = threading.Thread(target=poll, name="alias-watch", daemon=True)
    thread.start()
    return thread


def build_application(model: SamplerModel, max_body_bytes: int = MAX_BODY_BYTES, token: str | None = None):
    """kserve's FastAPI application serving ``model`` (kserve keeps one application per process)."""
    import kserve.model_server
    from kserve import ModelRepository
    from kserve.errors import InvalidInput
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension
    from kserve.protocol.rest.server import RESTServer
    from fastapi.exceptions import RequestValidationError
    from starlette.responses import JSONResponse

    class RequestDataPlane(DataPlane):
        """kserve's data plane, ready when the model is, with every failure to decode a request body answered as
        the client's error (kserve answers some malformed bodies with a 500), and binary tensors held to the sizes
        they declare."""

        async def ready(self) -> bool:
            # kserve's answers ready whatever the models are; the probe must follow the model (503 until loaded)
            models = self.model_registry.get_models()
            return bool(models) and all([await model.healthy() for model in models.values()])

        def decode(self, body, headers, *args, **kwargs):
            try:
                if isinstance(body, bytes) and JSON_LENGTH_HEADER.decode() in headers:
                    _check_binary_tensors(body, int(headers[JSON_LENGTH_HEADER.decode()]))
                return super().decode(body, headers, *args, **kwargs)
            except InvalidInput:
                raise
            except Exception as err:  # noqa: BLE001  (only the request was being read)
                raise InvalidInput(f"request body: cannot be read as an inference request ({err})") from None

    repository = ModelRepository()
    repository.update(model)
    server = RESTServer(kserve.model_server.FASTAPI_APP_IMPORT_STRING, RequestDataPlane(model_registry=repository),
                        ModelRepositoryExtension(model_registry=repository), http_port=0)
    server.create_application()
    app = kserve.model_server.app

    async def client_error(request, error: InvalidInput):
        # the client's mistake, one line: kserve logs a traceback at ERROR for each, which a stream of bad
        # requests turns into a flood
        logger.info("400 %s: %s", request.url.path, error)
        return JSONResponse(status_code=400, content={"error": str(error)})

    async def invalid_body(request, error: RequestValidationError):
        # FastAPI's own answer echoes the body back, and cannot when it holds non-JSON floats (a 500)
        return await client_error(request, InvalidInput(_first_problem(error.errors())))

    app.add_exception_handler(InvalidInput, client_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes, token=token)
    return app


def run_server(model: SamplerModel, host: str = "127.0.0.1", port: int = 8080, **limits) -> None:
    import uvicorn

    uvicorn.run(build_application(model, **limits), host=host, port=port, log_level="warning")
