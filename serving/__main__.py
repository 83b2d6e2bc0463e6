"""``python -m serving --model NAME``: the serving image's entry point, run by a KServe InferenceService.

The same application as the local ``sonogen serve`` (kserve's REST server and data plane behind the request limits,
the bearer token and without the model-repository routes), on the interface a pod must listen on. Settings come
from flags or ``SONOGEN_SERVE_*`` variables; the token from ``SONOGEN_SERVE_TOKEN`` (a Secret in the manifest).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from serving.app import MAX_BODY_BYTES, model_uri, run_server, watch_alias
from serving.predictor import SamplerModel
from sonogen.registry import model_name_of


def main(argv: list[str] | None = None) -> None:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=env("SONOGEN_SERVE_MODEL"), required=not env("SONOGEN_SERVE_MODEL"),
                        help="registered model name, a models:/ URI, or a saved generator's folder / s3:// URI")
    parser.add_argument("--alias", default=env("SONOGEN_SERVE_ALIAS", "champion"))
    parser.add_argument("--version", default=env("SONOGEN_SERVE_VERSION"))
    # a pod is reached on its own address (kubelet probes, the Service), so all interfaces by default
    parser.add_argument("--host", default=env("SONOGEN_SERVE_HOST", "0.0.0.0"))
    parser.add_argument("--http_port", type=int, default=int(env("SONOGEN_SERVE_PORT", "8080")))
    parser.add_argument("--token", default=env("SONOGEN_SERVE_TOKEN") or None,
                        help="require 'Authorization: Bearer TOKEN' on everything but the health probes")
    parser.add_argument("--max-n", type=int, default=int(env("SONOGEN_SERVE_MAX_N", "256")))
    parser.add_argument("--max-batch", type=int, default=int(env("SONOGEN_SERVE_MAX_BATCH", "0")) or None,
                        help="images per network call (default: 16 on a CPU; on a GPU 1024 for GANs, 64 else)")
    parser.add_argument("--precision", default=env("SONOGEN_SERVE_PRECISION") or None, choices=("fp32", "bf16"),
                        help="what requests that name none sample at (torch families; default fp32)")
    parser.add_argument("--channels-last", action="store_true",
                        default=env("SONOGEN_SERVE_CHANNELS_LAST", "").lower() in ("1", "true"),
                        help="a torch family's networks in NHWC memory order")
    parser.add_argument("--compile", action="store_true",
                        default=env("SONOGEN_SERVE_COMPILE", "").lower() in ("1", "true"),
                        help="a torch family's networks compiled (torch.compile) at the first draw of each batch shape")
    parser.add_argument("--max-body-bytes", type=int, default=int(env("SONOGEN_SERVE_MAX_BODY_BYTES", MAX_BODY_BYTES)))
    parser.add_argument("--watch", type=float, default=float(env("SONOGEN_SERVE_WATCH_S", "0")),
                        help="poll the alias every this many seconds and reload on promotion (0: off)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uri = model_uri(args.model, args.alias, args.version)
    model = SamplerModel(model_name_of(uri), uri, max_n=args.max_n, max_batch=args.max_batch,
                         precision=args.precision, channels_last=args.channels_last, compile=args.compile)
    if not model.load():
        sys.exit(f"{uri} does not exist in the registry at {os.environ.get('MLFLOW_TRACKING_URI', 'the default store')}")
    if args.watch:
        watch_alias(model, args.watch)
    if not args.token:
        logging.getLogger("sonogen.serving").warning(
            "no SONOGEN_SERVE_TOKEN: whoever reaches %s:%d can sample; rely on the mesh in front of it, or set one",
            args.host, args.http_port)
    run_server(model, args.host, args.http_port, max_body_bytes=args.max_body_bytes, token=args.token)


if __name__ == "__main__":
    main()
