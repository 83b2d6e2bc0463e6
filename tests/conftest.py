"""Shared test fixtures: small generated sources for the importers (videos, GIFs, DICOMs, BUSI and POCUS layouts,
broken files), and a real S3 API on loopback with a clean AWS environment."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"
NAME = "lus-dcgan-consolidation"  # the registered model of the `registry` fixture


def fan_frame(rng: np.random.Generator, size: tuple[int, int] = (72, 96), shift: int = 0) -> np.ndarray:
    """A grey frame with a bright trapezoid 'scan area' on black, and a 'text' blob in the top-left corner."""
    height, width = size
    y, x = np.mgrid[0:height, 0:width]
    half = 10 + (y - 8) * 0.45
    inside = (y >= 8) & (np.abs(x - width / 2 - shift) <= half)
    frame = np.where(inside, 60 + rng.integers(0, 120, size), 0).astype(np.uint8)
    frame[1:4, 1:8] = 250
    return frame


def write_video(path: Path, frames: list[np.ndarray], fps: int = 10, codec: str = "mpeg4") -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            rgb = np.repeat(frame[..., None], 3, axis=2)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_gif(path: Path, frames: list[np.ndarray], durations_ms: list[int]) -> None:
    images = [Image.fromarray(f).convert("P") for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations_ms, loop=0)


def write_dicom(path: Path, frames: np.ndarray, patient_id: str, frame_time_ms: float | None = None, rgb=False,
                burned_in: str | None = "NO"):
    """An ultrasound DICOM shaped like an archive's: patient name, id, birth date and institution in the header;
    ``burned_in`` is its BurnedInAnnotation (None: the tag is absent)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.PatientID = patient_id
    ds.PatientName = "Doe^Jane"
    ds.PatientBirthDate = "19700101"
    ds.InstitutionName = "General Hospital"
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    if frame_time_ms is not None:
        ds.FrameTime = frame_time_ms
    pixels = np.repeat(frames[..., None], 3, axis=-1) if rgb else frames
    if len(frames) == 1:
        pixels = pixels[0]
    ds.set_pixel_data(pixels, "RGB" if rgb else "MONOCHROME2", 8)
    ds.save_as(path, enforce_file_format=True)


MLFLOW_STATE = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")
MLFLOW_AT_START = {name: os.environ.get(name) for name in MLFLOW_STATE}


@pytest.fixture(autouse=True)
def mlflow_environment_stays_in_its_test():
    """MLflow writes its tracking URI and active experiment into the environment (set_tracking_uri, set_experiment),
    where a later test's subprocesses (dvc repro, a server) would inherit another test's store: every test ends with
    the MLflow variables the session began with (a shared fixture made during a test is undone with it too)."""
    yield
    for name, value in MLFLOW_AT_START.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def pocus_tree(tmp_path: Path, rng) -> Path:
    """A POCUS-layout folder: the shipped CC-BY stills, generated videos of every container, and broken files."""
    root = tmp_path / "pocus"
    shutil.copytree(FIXTURES / "pocus-cc-by", root)
    videos = root / "data" / "pocus_videos" / "convex"
    videos.mkdir(parents=True)
    frames = [fan_frame(rng, shift=k) for k in range(20)]  # 2 s at 10 fps
    write_video(videos / "Pneu_northumbria_0409_set2_vid1.mp4", frames)
    write_video(videos / "Pneu_northumbria_0409_set2_vid2.avi", frames[:10])
    write_video(videos / "Reg_pat1Image_000001.mpeg", frames[:10], fps=25, codec="mpeg2video")
    write_gif(videos / "Reg-Atlas-alines.gif", frames[:4], durations_ms=[100, 500, 100, 300])
    (videos / "Cov_empty_clip.mp4").write_bytes(b"")
    data = (videos / "Pneu_northumbria_0409_set2_vid1.mp4").read_bytes()
    (videos / "Cov_truncated_clip.mp4").write_bytes(data[: len(data) // 3])
    (videos / "Reg_notes.txt").write_text("not an image")
    (videos / "Unlabelled_clip.mp4").write_bytes(data)
    return root


@pytest.fixture
def busi_tree(tmp_path: Path, rng) -> Path:
    root = tmp_path / "busi"
    for label in ("benign", "malignant", "normal"):
        (root / label).mkdir(parents=True)
    image = rng.integers(0, 255, (60, 80), dtype=np.uint8)

    def mask(*boxes):
        m = np.zeros((60, 80), dtype=np.uint8)
        for x0, y0, x1, y1 in boxes:
            m[y0:y1, x0:x1] = 255
        return m

    Image.fromarray(np.stack([image] * 3, axis=-1)).save(root / "benign" / "benign (1).png")
    Image.fromarray(mask((10, 12, 30, 25))).save(root / "benign" / "benign (1)_mask.png")
    Image.fromarray(mask((50, 30, 70, 50))).save(root / "benign" / "benign (1)_mask_1.png")
    Image.fromarray(image).save(root / "malignant" / "malignant (7).png")
    Image.fromarray(mask((5, 5, 25, 40))).save(root / "malignant" / "malignant (7)_mask.png")
    Image.fromarray(image).save(root / "normal" / "normal (3).png")
    Image.fromarray(mask()).save(root / "normal" / "normal (3)_mask.png")
    Image.fromarray(mask((1, 1, 5, 5))).save(root / "malignant" / "malignant (9)_mask.png")  # no image
    Image.fromarray(image).save(root / "benign" / "benign (2).png")
    truncated = (root / "benign" / "benign (2).png").read_bytes()
    (root / "benign" / "benign (2).png").write_bytes(truncated[: len(truncated) // 2])
    Image.fromarray(mask((1, 1, 5, 5))).save(root / "benign" / "benign (2)_mask.png")
    return root


@pytest.fixture(scope="module")
def s3_server() -> str:
    """A real S3 API (moto's server) on a free loopback port; its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch, tmp_path) -> dict[str, str]:
    """Test credentials in the environment, and nothing of the developer's own AWS set-up (profiles, config
    files, endpoints) leaking in; the variables set."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    values = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
              "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
              "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials")}
    for var, value in values.items():
        monkeypatch.setenv(var, value)
    return values


def start_server(root: Path, tracking_uri: str, model: str, *args: str) -> tuple[subprocess.Popen, str]:
    """``sonogen serve --model MODEL ARGS`` as a real process on a free loopback port, once it answers; its output
    goes to ``root/serve-PORT.log`` (a pipe nobody reads would fill and stop the server)."""
    import requests
    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = root / f"serve-{port}.log"
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, "-m", "sonogen.cli", "serve", "--model", model, "--port",
                                    str(port), *args], cwd=root,
                                   # as many threads as this process: sums rounded alike, images equal to its samples
                                   env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
                                        "OMP_NUM_THREADS": str(torch.get_num_threads())},
                                   stdout=output, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited: {log.read_text()}")
        try:
            if requests.get(f"{url}/v2/health/live", timeout=1).status_code == 200:
                return process, url
        except requests.ConnectionError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError(f"server did not start in 60 s: {log.read_text()}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="session")
def lus(tmp_path_factory) -> Path:
    """A prepared 32 px phantom of 8 patients (consolidation masks and boxes included), shared read-only."""
    from sonogen.data.phantom import generate
    from sonogen.data.prepare import prepare

    root = tmp_path_factory.mktemp("phantom32")
    generate(root / "raw", patients=8, frames_per_patient=3, seed=0)
    prepare(root / "raw", root / "lus", size=32, split="0.7,0.15,0.15", seed=0, stratify=True)
    return root / "lus"


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    """Two versions of one tiny generator: v1 passed its gates and is exported to ONNX, v2 was never gated."""
    import mlflow
    import yaml

    from sonogen.data.phantom import generate
    from sonogen.data.prepare import prepare
    from sonogen.export import export_registered
    from sonogen.jobs import register_trained, train_generator

    root = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        generate(root / "raw", patients=6, frames_per_patient=2, seed=0)
        prepare(root / "raw", root / "lus", size=32, stratify=True)
        (root / "tiny.yaml").write_text(yaml.safe_dump({
            "model": {"image_size": 32, "base_channels": 4},
            "train": {"epochs": 1, "batch_size": 4, "eval_samples": 4},
        }))
        train_generator("dcgan", root / "lus", "consolidation", root / "trained", config_path=root / "tiny.yaml",
                        register=False)
        assert register_trained(root / "trained")["version"] == "1"
        assert register_trained(root / "trained")["version"] == "2"
        # stands for a version that went through `sonogen evaluate` and passed (tests/test_gates.py covers that path)
        mlflow.MlflowClient().set_model_version_tag(NAME, "1", "gate", "passed")
        export = export_registered(f"models:/{NAME}/1")
        yield {"root": root, "uri": os.environ["MLFLOW_TRACKING_URI"], "export": export}


@pytest.fixture(scope="session")
def base_ldm(lus, tmp_path_factory):
    """A from-scratch ldm of both labels, the anatomy model DiffUltra and lesion pairs build on."""
    import torch

    from sonogen.generators.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
    from sonogen.generators.trainer import TrainConfig, train

    torch.manual_seed(0)
    model = LatentDiffusion(LatentDiffusionConfig(label="normal", image_size=32, vae_channels=(8, 16),
                                                  unet_channels=(16, 32), embedding_dim=16, vae_steps=2, steps=3))
    out = tmp_path_factory.mktemp("base-ldm")
    train(model, lus, "normal", TrainConfig(epochs=2, batch_size=2, steps_per_epoch=2, eval_samples=2,
                                            precision="fp32"), out)
    return out / "generator"
