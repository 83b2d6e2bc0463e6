"""The HTTP side: kserve's REST application (its dataplane, v1 and v2 protocols) behind request limits and an
optional bearer token, run with uvicorn on the host we choose; and an alias watcher that reloads on promotion."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from serving.predictor import SamplerModel

logger = logging.getLogger("sonogen.serving")
MAX_BODY_BYTES = 64 * 1024
# probes stay open: on a cluster the kubelet calls them without credentials
OPEN_PATHS = ("/", "/v2/health/live", "/v2/health/ready")


class RequestLimits:
    """ASGI middleware: a body over ``max_body_bytes`` is a 400 before any of it is parsed, and with a ``token``
    every other path needs ``Authorization: Bearer <token>``."""

    def __init__(self, app, max_body_bytes: int = MAX_BODY_BYTES, token: str | None = None):
        self.app, self.max_body_bytes, self.token = app, max_body_bytes, token

    @staticmethod
    async def _reject(send, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token and scope["path"] not in OPEN_PATHS \
                and headers.get(b"authorization", b"").decode() != f"Bearer {self.token}":
            return await self._reject(send, 401, "missing or invalid bearer token")
        too_large = f"request body: larger than {self.max_body_bytes} bytes"
        if int(headers.get(b"content-length", b"0") or 0) > self.max_body_bytes:
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
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


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
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension
    from kserve.protocol.rest.server import RESTServer

    repository = ModelRepository()
    repository.update(model)
    server = RESTServer(kserve.model_server.FASTAPI_APP_IMPORT_STRING, DataPlane(model_registry=repository),
                        ModelRepositoryExtension(model_registry=repository), http_port=0)
    server.create_application()
    kserve.model_server.app.add_middleware(RequestLimits, max_body_bytes=max_body_bytes, token=token)
    return kserve.model_server.app


def serve_local(model: SamplerModel, host: str = "127.0.0.1", port: int = 8080, **limits) -> None:
    import uvicorn

    uvicorn.run(build_application(model, **limits), host=host, port=port, log_level="warning")
