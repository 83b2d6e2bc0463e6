"""`sonogen train … --nproc-per-node N`: the same command on N local ranks, started by torch's own launcher
(torchrun, a standalone rendezvous on loopback). A cluster runs it through Kubeflow Trainer instead (trainjob.py)."""

from __future__ import annotations

import subprocess
import sys

from sonogen.generators import distributed

NPROC_OPTION = "--nproc-per-node"


def without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` or ``option=VALUE``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(f"{option}="):
            kept.append(arg)
    return kept


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """torchrun starting ``sonogen ARGV`` on ``nproc`` ranks of this machine; a rank that dies fails the job
    (no restarts: ``--resume`` continues from the last checkpoint). ``--`` keeps torchrun from reading sonogen's
    options as abbreviations of its own."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--max-restarts=0", "-m", "sonogen.cli", "--", *without_option(argv, NPROC_OPTION)]


def run_on_local_ranks(nproc: int, argv: list[str]) -> int:
    """Runs ``sonogen ARGV`` under torchrun and returns its exit status."""
    if nproc < 1:
        raise ValueError(f"{NPROC_OPTION} must be at least 1, got {nproc}")
    if distributed.launched():
        raise ValueError(f"{NPROC_OPTION}: this process is already one of torchrun's ranks; leave the option out "
                         f"when torchrun (or Kubeflow Trainer) starts sonogen")
    return subprocess.call(torchrun_command(nproc, argv))
