"""A sixth family, written here in a few lines, goes through the platform with no change outside this file: the
`train`, `evaluate` and `register` commands, the serving backend, and the pipeline's runs; a family that builds on
it gets its base trained first. Typed settings (`--set`) and the deprecated per-family flags."""

from dataclasses import dataclass
from typing import Any

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from sonogen.cli import app
from sonogen.config import config_from_dict, parse_assignments
from sonogen.generators import Generator, get_generator, register_family
from sonogen.generators.families import unregister_family
from sonogen.sampling import gaussian_latents


@dataclass
class ToyConfig:
    label: str
    image_size: int = 32
    latent_dim: int = 8
    lr: float = 0.01
    base_model: str = ""  # toyplus only: the toy it starts from


class Toy(Generator):
    """A linear map from seeded latents to images, trained to the training images' mean."""

    family = "toy"
    config_class = ToyConfig
    conditions = frozenset({"label"})

    def __init__(self, config: ToyConfig):
        super().__init__(config)
        self.net = nn.Linear(config.latent_dim, config.image_size**2)
        self._optimizers = None

    def networks(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        self._optimizers = self._optimizers or {"net": torch.optim.Adam(self.net.parameters(), lr=self.config.lr)}
        return self._optimizers

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def train_step(self, images: torch.Tensor) -> dict[str, float]:
        loss = (self.generate(len(images), self.step, {}) - images).square().mean()
        self.optimizers()["net"].zero_grad()
        loss.backward()
        self.optimizers()["net"].step()
        self.step += 1
        return {"loss": loss.item()}

    def generate(self, n: int, seed: int, condition: dict[str, Any]) -> torch.Tensor:
        latents = torch.from_numpy(gaussian_latents(seed, n, self.config.latent_dim)).to(self.device)
        return torch.tanh(self.net(latents)).reshape(n, 1, self.image_size, self.image_size)


class ToyPlus(Toy):
    """A toy that trains on top of another: the platform must train that one first, from train.toy."""

    family = "toyplus"

    @classmethod
    def prerequisites(cls, settings: dict[str, Any]) -> dict[str, str]:
        return {} if settings.get("base_model") else {"base_model": "toy"}


TINY = {"train": {"epochs": 2, "batch_size": 4, "eval_samples": 4}}


@pytest.fixture(autouse=True)
def toy_families():
    """The families exist while these tests run, as a plugin's would; other tests see the built-in ones only."""
    for family in (Toy, ToyPlus):
        register_family(family)
    yield
    for family in (Toy, ToyPlus):
        unregister_family(family.family)


@pytest.fixture
def workdir(lus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "train": {"families": ["toy"], "labels": ["consolidation"], "toy": TINY, "toyplus": TINY},
        "evaluate": {"samples": 8, "downstream": None},
        "gates": {"toy": {"extractor": "pixels-16", "max_near_copy_fraction": 1.0}},
    }))
    return tmp_path


def test_a_new_family_trains_gates_registers_and_serves_with_no_change_outside_its_file(lus, workdir):
    from sonogen.backends import load_backend

    runner = CliRunner()
    common = ["--data", str(lus), "--label", "consolidation", "--config", "params.yaml", "--dataset", "lus"]
    trained = runner.invoke(app, ["train", "toy", *common, "--no-register", "--set", "lr=0.02"])
    assert trained.exit_code == 0, trained.output
    assert (workdir / "models" / "toy-consolidation" / "generator" / "weights.safetensors").is_file()
    gated = runner.invoke(app, ["evaluate", "models/toy-consolidation", "--data", str(lus), "--config", "params.yaml",
                                "--extractor", "pixels-16"])
    assert gated.exit_code == 0 and "toy-consolidation: passed" in gated.output, gated.output
    registered = runner.invoke(app, ["register", "models/toy-consolidation", "--gates", "reports/gates"])
    assert registered.exit_code == 0 and "registered lus-toy-consolidation version 1" in registered.output
    backend = load_backend("models:/lus-toy-consolidation/1")
    assert (backend.family, backend.runtime) == ("toy", "torch:cpu")
    images = backend.images(3, seed=5)
    assert images.shape == (3, 32, 32) and (images == backend.images(3, seed=5)).all()


def test_a_family_that_builds_on_another_gets_it_trained_first(lus, workdir):
    runner = CliRunner()
    common = ["--data", str(lus), "--label", "consolidation", "--config", "params.yaml", "--no-register"]
    refused = runner.invoke(app, ["train", "toyplus", *common])
    assert refused.exit_code == 1 and "base_model (a trained toy)" in refused.output
    built = runner.invoke(app, ["train", "toyplus", *common, "--build-prerequisites"])
    assert built.exit_code == 0, built.output
    out = workdir / "models" / "toyplus-consolidation"
    assert (out / "base" / "generator" / "weights.safetensors").is_file()
    from sonogen.generators import load_generator

    assert load_generator(out / "generator").config.base_model == "models/toyplus-consolidation/base/generator"


def test_the_pipeline_runs_a_new_family_listed_in_train_families(workdir):
    from pipelines.training import arguments_from_params, compile_pipeline

    params = (workdir / "params.yaml").read_text()
    assert arguments_from_params(params)["runs"] == [{"family": "toy", "label": "consolidation"}]
    spec = next(yaml.safe_load_all(compile_pipeline(workdir / "p.yaml", params).read_text()))
    assert spec["root"]["inputDefinitions"]["parameters"]["runs"]["defaultValue"] == [
        {"family": "toy", "label": "consolidation"}]


def test_settings_are_typed_and_unknown_keys_list_the_valid_ones(lus, workdir):
    assert parse_assignments(["lr=0.5", "image_size=64", "base_model=", "labels=[a, b]"]) == {
        "lr": 0.5, "image_size": 64, "base_model": "", "labels": ["a", "b"]}
    with pytest.raises(ValueError, match=r"ToyConfig.image_size: expected int, got 'big'"):
        config_from_dict(ToyConfig, {"label": "x", "image_size": "big"})
    with pytest.raises(ValueError, match=r"unknown ToyConfig keys \['lerning_rate'\]; valid keys: \['base_model', "):
        config_from_dict(ToyConfig, {"label": "x", "lerning_rate": 1})
    result = CliRunner().invoke(app, ["train", "toy", "--data", str(lus), "--label", "consolidation", "--set",
                                      "image_size=big"])
    assert result.exit_code == 1 and "ToyConfig.image_size: expected int" in result.output
    assert CliRunner().invoke(app, ["train", "toy", "--data", str(lus), "--label", "x", "--set", "lr"]).exit_code == 1
    assert get_generator("toy") is Toy


def test_a_deprecated_family_flag_still_works_and_says_what_to_write(lus, workdir):
    result = CliRunner().invoke(app, ["train", "toy", "--data", str(lus), "--label", "consolidation", "--config",
                                      "params.yaml", "--no-register", "--base-model", "unused"])
    assert result.exit_code == 0, result.output
    assert "--base-model is deprecated: write --set base_model=unused" in result.output
