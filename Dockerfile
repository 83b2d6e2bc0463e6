# syntax=docker/dockerfile:1.7
#
# sonogen container images: three targets of one multi-stage build (BuildKit, the default builder of Docker >= 23).
#
#   train  the image every Kubeflow Pipelines component runs in (`sonogen ...`): CUDA base, Python 3.11, the whole
#          project installed from requirements.lock, with torch (same pin as the lock) resolved to PyTorch's CUDA build.
#   serve  the slim KServe predictor (`python -m serving`): python:3.11-slim, kserve + onnxruntime-gpu (with the CUDA
#          and cuDNN runtime wheels), mlflow-skinny (the registry client) and boto3 (S3 artifacts), numpy, pillow,
#          pyyaml, and the project's packages installed without their dependencies -- no torch, full MLflow, DVC or
#          diffusers. Only modules that import nothing beyond that set work there (the `serving` package and the
#          parts of `sonogen` it uses): it serves generators exported with `sonogen export onnx`.
#   serve-gpu  the predictor of every family on NVIDIA GPUs (`python -m serving`): the train image (CUDA torch,
#          diffusers, the whole lock) with onnxruntime-gpu in place of onnxruntime, so exported GANs run on ONNX
#          Runtime's CUDA provider and SinDDM, FewDDM, ldm and DiffUltra on CUDA torch.
#
# Image tags: ghcr.io/sonogen/sonogen-train:<version>, ghcr.io/sonogen/sonogen-serve:<version> and
# ghcr.io/sonogen/sonogen-serve-gpu:<version>, where <version> is `version` in pyproject.toml -- now
# ghcr.io/sonogen/sonogen-train:0.1.0, ghcr.io/sonogen/sonogen-serve:0.1.0 and ghcr.io/sonogen/sonogen-serve-gpu:0.1.0.
# A pushed version is never rebuilt with other content: bump pyproject's version (and these lines) instead.
#
# Build and push, from the repository root:
#   VERSION=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
#   docker build --target train --build-arg GIT_COMMIT=$(git rev-parse HEAD) -t ghcr.io/sonogen/sonogen-train:$VERSION .
#   docker build --target serve --build-arg GIT_COMMIT=$(git rev-parse HEAD) -t ghcr.io/sonogen/sonogen-serve:$VERSION .
#   docker build --target serve-gpu --build-arg GIT_COMMIT=$(git rev-parse HEAD) -t ghcr.io/sonogen/sonogen-serve-gpu:$VERSION .
#   docker push ghcr.io/sonogen/sonogen-train:$VERSION
#   docker push ghcr.io/sonogen/sonogen-serve:$VERSION
#   docker push ghcr.io/sonogen/sonogen-serve-gpu:$VERSION
#
# The training pipeline takes its component image from `--image`, else from the environment variable SONOGEN_IMAGE,
# else ghcr.io/sonogen/sonogen-train:<version>: push the train image before submitting a run of a new version.
#
# GPUs: torch 2.13.0 and onnxruntime-gpu 1.31.1 are CUDA 13.0 builds; the GPU nodes need an NVIDIA driver >= 580.
# For an older driver, build `train` with a CUDA 12 base and wheel index PyTorch publishes for this torch version,
# e.g. --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 --build-arg TORCH_CUDA=cu128.
#
# The images hold no .git (see .dockerignore): GIT_COMMIT is recorded as the label org.opencontainers.image.revision
# and the environment variable SONOGEN_GIT_COMMIT.

ARG PYTHON_VERSION=3.11.14
# `base`, not `runtime`/`cudnn-runtime`: torch's CUDA wheels bring their own CUDA, cuDNN and NCCL libraries as pip
# packages; the base image adds only the NVIDIA container runtime settings (driver capabilities, the CUDA version
# check against the host driver), so the multi-GB CUDA libraries are not shipped twice.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
ARG SERVE_IMAGE=python:${PYTHON_VERSION}-slim-bookworm

# uv only downloads a standalone CPython 3.11 for the train image (Ubuntu 24.04 ships 3.12); pip does the installs.
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv


# ------------------------------------------------------------------------------------------------------- train --
FROM ${CUDA_IMAGE} AS train

ARG PYTHON_VERSION
# PyTorch's wheel index for the CUDA version of CUDA_IMAGE (cu130 = CUDA 13.0).
ARG TORCH_CUDA=cu130
ARG GIT_COMMIT=unknown

LABEL org.opencontainers.image.title="sonogen-train" \
      org.opencontainers.image.revision="${GIT_COMMIT}"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    MLFLOW_DISABLE_TELEMETRY=true \
    HF_HUB_OFFLINE=1 \
    GIT_PYTHON_REFRESH=quiet \
    SONOGEN_GIT_COMMIT=${GIT_COMMIT}

# git: DVC and MLflow's git lookups. Ubuntu images already have a user and group 1000 (`ubuntu`): replace them.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates git \
 && rm -rf /var/lib/apt/lists/* \
 && (userdel --remove ubuntu 2>/dev/null || true) && (groupdel ubuntu 2>/dev/null || true) \
 && groupadd --gid 1000 sonogen \
 && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash sonogen

RUN --mount=from=uv,source=/uv,target=/usr/local/bin/uv \
    UV_PYTHON_INSTALL_DIR=/opt/python UV_PYTHON_PREFERENCE=only-managed UV_NO_CACHE=1 \
    uv venv --seed --python "${PYTHON_VERSION}" /opt/venv \
 && python -c "import sys; assert sys.version.startswith('${PYTHON_VERSION}'), sys.version"

WORKDIR /app

# Dependencies first (their layer is reused while only the source changes). The extra index makes the lock's
# `torch==2.13.0` resolve to PyTorch's `2.13.0+cu130` wheel (a local version sorts above the plain one); every
# other package keeps the lock's exact version. The check fails the build on a CPU-only or differently pinned torch.
COPY requirements.lock ./
RUN python -m pip install --extra-index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" -r requirements.lock \
 && python -c "import re, torch; want = re.search(r'^torch==(\S+)$', open('requirements.lock').read(), re.M).group(1); assert torch.__version__.split('+')[0] == want, (torch.__version__, want); assert torch.version.cuda, 'CPU-only torch'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

# The source tree as filtered by .dockerignore: sonogen/ and the other top-level packages (components/, pipelines/,
# serving/, whichever exist), configs/, params.yaml, dvc.yaml. The project goes into the venv, not in editable mode.
COPY --chown=1000:1000 . .
RUN python -m pip install --no-deps . \
 && rm -rf build ./*.egg-info \
 && sonogen --help > /dev/null

USER 1000:1000
ENTRYPOINT ["sonogen"]


# --------------------------------------------------------------------------------------------------- serve-gpu --
FROM train AS serve-gpu

LABEL org.opencontainers.image.title="sonogen-serve-gpu"

# onnxruntime-gpu is the same import package as the lock's onnxruntime, at its release; it finds the CUDA, cuDNN and
# cuBLAS libraries torch's CUDA wheels brought (their folders go into the loader cache). The checks fail the build
# without ORT's CUDA provider, with a CPU-only torch or without the diffusion and serving imports.
USER 0:0
RUN ORT_VERSION=$(sed -n 's/^onnxruntime==//p' requirements.lock) \
 && test -n "$ORT_VERSION" \
 && python -m pip uninstall --yes onnxruntime \
 && python -m pip install -c requirements.lock "onnxruntime-gpu==${ORT_VERSION}" \
 && python -c "import glob, os, sysconfig; site = sysconfig.get_paths()['purelib']; dirs = sorted({os.path.dirname(p) for p in glob.glob(os.path.join(site, 'nvidia', '**', 'lib*.so*'), recursive=True)}); assert dirs, 'no CUDA libraries'; open('/etc/ld.so.conf.d/zz-nvidia-wheels.conf', 'w').write(''.join(d + chr(10) for d in dirs))" \
 && ldconfig \
 && python -c "import onnxruntime, torch, diffusers, peft, kserve, serving.predictor; assert 'CUDAExecutionProvider' in onnxruntime.get_available_providers(), onnxruntime.get_available_providers(); assert torch.version.cuda, 'CPU-only torch'"

USER 1000:1000
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility
# KServe's default REST and gRPC ports.
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "serving"]


# ------------------------------------------------------------------------------------------------------- serve --
FROM ${SERVE_IMAGE} AS serve

ARG GIT_COMMIT=unknown

LABEL org.opencontainers.image.title="sonogen-serve" \
      org.opencontainers.image.revision="${GIT_COMMIT}"

# NVIDIA_DRIVER_CAPABILITIES: without `compute` the NVIDIA container runtime mounts no libcuda into a non-CUDA base.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    MLFLOW_DISABLE_TELEMETRY=true \
    HF_HUB_OFFLINE=1 \
    SONOGEN_GIT_COMMIT=${GIT_COMMIT}

RUN groupadd --gid 1000 sonogen \
 && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin sonogen \
 && python -m venv /opt/venv

WORKDIR /app

# `-c requirements.lock`: every package the lock pins (numpy, pillow, fastapi, protobuf, kserve, mlflow-skinny, ...)
# gets the lock's version. onnxruntime-gpu and onnxruntime are the same import package: only the GPU one is here.
# The CUDA/cuDNN wheels' library folders go into the loader cache so ORT's CUDA provider finds them on its own.
COPY requirements.lock ./
RUN python -m pip install -c requirements.lock \
        "kserve==0.21.0" "onnxruntime-gpu[cuda,cudnn]==1.31.1" mlflow-skinny boto3 numpy pillow pyyaml \
 && python -c "import glob, os, sysconfig; site = sysconfig.get_paths()['purelib']; dirs = sorted({os.path.dirname(p) for p in glob.glob(os.path.join(site, 'nvidia', '**', 'lib*.so*'), recursive=True)}); assert dirs, 'no CUDA libraries'; open('/etc/ld.so.conf.d/zz-nvidia-wheels.conf', 'w').write(''.join(d + chr(10) for d in dirs))" \
 && ldconfig \
 && python -c "import onnxruntime, kserve, mlflow; assert 'CUDAExecutionProvider' in onnxruntime.get_available_providers()"

COPY --chown=1000:1000 . .
RUN python -m pip install --no-deps . \
 && rm -rf build ./*.egg-info

USER 1000:1000
# KServe's default REST and gRPC ports.
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "serving"]
