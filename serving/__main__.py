"""``python -m serving --model NAME``: the serving image's entry point, run by a KServe InferenceService.

In a pod kserve's own ``ModelServer`` serves on all interfaces (the mesh in front of it does auth); the local
``sonogen serve`` binds loopback instead. Settings come from flags or ``SONOGEN_SERVE_*`` variables.
"""

from __future__ import annotations

import argparse
import os
import sys

from serving.app import MAX_BODY_BYTES, RequestLimits, model_uri, watch_alias
from sonogen.registry import model_name_of
from serving.predictor import SamplerModel


def main(argv: list[str] | None = None) -> None:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=env("SONOGEN_SERVE_MODEL"), required=not env("SONOGEN_SERVE_MODEL"),
                        help="registered model name, a models:/ URI, or a saved generator's folder / s3:// URI")
    parser.add_argument("--alias", default=env("SONOGEN_SERVE_ALIAS", "champion"))
    parser.add_argument("--version", default=env("SONOGEN_SERVE_VERSION"))
    parser.add_argument("--http_port", type=int, default=int(env("SONOGEN_SERVE_PORT", "8080")))
    parser.add_argument("--max-n", type=int, default=int(env("SONOGEN_SERVE_MAX_N", "256")))
    parser.add_argument("--max-batch", type=int, default=int(env("SONOGEN_SERVE_MAX_BATCH", "16")))
    parser.add_argument("--max-body-bytes", type=int, default=int(env("SONOGEN_SERVE_MAX_BODY_BYTES", MAX_BODY_BYTES)))
    parser.add_argument("--watch", type=float, default=float(env("SONOGEN_SERVE_WATCH_S", "0")),
                        help="poll the alias every this many seconds and reload on promotion (0: off)")
    args = parser.parse_args(argv)

    import kserve
    import kserve.model_server

    uri = model_uri(args.model, args.alias, args.version)
    model = SamplerModel(model_name_of(uri), uri, max_n=args.max_n, max_batch=args.max_batch)
    if not model.load():
        sys.exit(f"{uri} does not exist in the registry at {os.environ.get('MLFLOW_TRACKING_URI', 'the default store')}")
    if args.watch:
        watch_alias(model, args.watch)
    kserve.model_server.app.add_middleware(RequestLimits, max_body_bytes=args.max_body_bytes)
    kserve.ModelServer(http_port=args.http_port, enable_grpc=False).start([model])


if __name__ == "__main__":
    main()
