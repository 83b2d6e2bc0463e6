"""The same work through `dvc repro` (the baseline) and through the Kubeflow pipeline run locally with kfp.local:
wall times and their ratio. Both prepare the phantom, train the us-encoder and one generator per label, gate
and register, with the parameters of PARAMS (default: the repository's params.yaml).

    python bench/pipeline_overhead.py [PARAMS] [WORKDIR]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(args: list[str], cwd: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    start = time.perf_counter()
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def main(params: str = str(REPO / "params.yaml"), workdir: str | None = None) -> None:
    root = Path(workdir or tempfile.mkdtemp(prefix="sonogen-overhead-"))
    dvc_dir, kfp_dir = root / "dvc", root / "kfp"
    for folder in (dvc_dir, kfp_dir):
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(params, folder / "params.yaml")
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, dvc_dir)
    (dvc_dir / "sonogen").symlink_to(REPO / "sonogen")  # the stages depend on the code
    subprocess.run(["git", "init", "-q"], cwd=dvc_dir, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=dvc_dir, check=True)
    dvc = timed([sys.executable, "-m", "dvc", "repro"], dvc_dir)
    kfp = timed([sys.executable, "-m", "sonogen.cli", "pipeline", "run", "--params", "params.yaml"], kfp_dir)
    print(f"params: {params}")
    print(f"dvc repro (baseline):        {dvc:7.1f} s")
    print(f"sonogen pipeline run (local): {kfp:7.1f} s ({kfp / dvc:.2f}× dvc repro)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
