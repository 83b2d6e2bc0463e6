#!/usr/bin/env bash
# Fetches, at requirements.lock's versions, the wheels that bench/gpu_checks.sh needs beyond a CUDA machine's usual
# Python stack (torch, numpy, pandas, scipy, transformers, huggingface_hub, safetensors, peft, typer, pytest, PyYAML,
# requests, grpcio, protobuf, httpx, psutil, prometheus-client): diffusers, MONAI, and the KServe server with the
# imports it makes. For a machine without network: run this where pip works, copy the folder along, and run
# `WHEELS=FOLDER bench/gpu_checks.sh OUT_DIR`.
#
#   bench/gpu_wheels.sh [FOLDER (default .whl)] [PYTHON_VERSION of the GPU machine (default 3.12)]
set -eu
folder=${1:-.whl}
python_version=${2:-3.12}
cd "$(dirname "$0")/.."
packages="diffusers importlib_metadata monai kserve cloudevents deprecation fastapi starlette uvicorn pydantic
  pydantic_core annotated-types typing-inspection orjson python-multipart timing-asgi kubernetes grpc-interceptor
  opentelemetry-api watchfiles google-auth pyasn1 pyasn1_modules cachetools cryptography cffi pycparser oauthlib
  requests-oauthlib websocket-client"
pins=()
for package in $packages; do
  pin=$(grep -i "^${package//[-_]/[-_]}==" requirements.lock) || {
    echo "$package is not in requirements.lock" >&2
    exit 1
  }
  pins+=("$pin")
done
mkdir -p "$folder"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$folder" "${pins[@]}"
du -sh "$folder"
