"""Kubeflow Pipelines components: one file per step, each a thin wrapper over a ``sonogen`` function.

Every component runs in the project image (``SONOGEN_IMAGE``, default ``ghcr.io/sonogen/sonogen-train:<version>``)
with ``sonogen`` already installed, so nothing is pip-installed when a step starts.
"""

import os
from importlib.metadata import version

IMAGE = os.environ.get("SONOGEN_IMAGE") or f"ghcr.io/sonogen/sonogen-train:{version('sonogen')}"
