import json

import pytest
import torch
from safetensors.torch import load_file

from sonogen.data.phantom import generate
from sonogen.data.prepare import prepare
from sonogen.generators import families, get_generator, load_generator
from sonogen.generators.dcgan import DCGAN, DCGANConfig, generator_flops
from sonogen.generators.trainer import TrainConfig, train


def tiny(size=32, **kw) -> DCGAN:
    torch.manual_seed(0)
    return DCGAN(DCGANConfig(label="consolidation", image_size=size, base_channels=4, **kw))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcgan")
    generate(root / "raw", patients=6, frames_per_patient=3, seed=0)
    prepare(root / "raw", root / "lus", size=32, split="0.7,0.15,0.15", seed=0, stratify=True)
    return root / "lus"


@pytest.mark.parametrize("size", [32, 64, 256])
def test_shapes_follow_the_image_size(size):
    model = tiny(size)
    images = model.generator(torch.randn(2, 100))
    assert images.shape == (2, 1, size, size) and images.abs().max() <= 1
    assert model.discriminator(images).shape == (2,)
    assert len(model.config.widths) == {32: 3, 64: 4, 256: 6}[size]


def test_paper_architecture_at_256px():
    config = DCGANConfig(label="consolidation")
    assert config.widths == [2048, 1024, 512, 256, 128, 64]
    model = DCGAN(config)
    convs = [m for m in model.generator.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [c.out_channels for c in convs] == [2048, 1024, 512, 256, 128, 64, 1]
    assert all(c.bias is None and c.kernel_size == (4, 4) for c in convs)
    d_convs = [m for m in model.discriminator.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in d_convs] == [64, 128, 256, 512, 1024, 2048, 1]
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.discriminator.modules()) == 6
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.discriminator.modules()) == 5
    assert generator_flops(config) == pytest.approx(5.41e9, rel=0.005)
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert weights.std().item() == pytest.approx(0.02, rel=0.05)


def test_the_convolutional_form_draws_the_images_of_the_transposed_convolutions():
    model = tiny(64)
    for norm in (m for m in model.generator.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.running_mean.normal_(0, 0.5), norm.running_var.uniform_(0.5, 2), norm.bias.data.normal_(0, 0.5)
    network, latents = model.int8_sampling_network()
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in network.modules())
    latents = model.latents(4, seed=1)
    with torch.no_grad():
        expected = model.generator.eval()(latents)
        assert expected.std() > 0.01 and torch.allclose(network(latents), expected, atol=1e-6)


def test_one_training_step_changes_both_networks():
    model = tiny()
    before = {k: v.clone() for k, v in model._weights().items()}
    losses = model.train_step(torch.rand(4, 1, 32, 32) * 2 - 1)
    after = model._weights()
    assert model.step == 1 and set(losses) >= {"loss_generator", "loss_discriminator"}
    for network in ("generator", "discriminator"):
        changed = [k for k in before if k.startswith(network) and "weight" in k and not torch.equal(before[k], after[k])]
        assert changed, f"{network} weights did not move"


def test_same_seed_same_samples_and_prefix_stability():
    model = tiny()
    a, b, c = model.sample(6, seed=3), model.sample(6, seed=3), model.sample(6, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # a smaller request draws the same latents; kernels may round differently at another batch size
    assert torch.allclose(model.sample(2, seed=3), a[:2], atol=1e-5)
    assert model.generator.training, "sampling restores the training mode"


def test_save_load_gives_identical_samples_without_pickle(tmp_path):
    model = tiny()
    model.train_step(torch.rand(4, 1, 32, 32) * 2 - 1)
    model.save(tmp_path / "g")
    assert set(p.name for p in (tmp_path / "g").iterdir()) == {"config.json", "weights.safetensors"}
    assert json.loads((tmp_path / "g" / "config.json").read_text())["config"]["label"] == "consolidation"
    assert load_file(str(tmp_path / "g" / "weights.safetensors"))  # safetensors, no pickle
    loaded = load_generator(tmp_path / "g")
    assert isinstance(loaded, DCGAN) and loaded.step == 1
    assert torch.equal(loaded.sample(5, seed=9), model.sample(5, seed=9))


def test_conditions_and_configs_are_checked():
    model = tiny()
    assert model.sample(1, 0, {"label": "consolidation"}).shape == (1, 1, 32, 32)
    with pytest.raises(ValueError, match="not 'normal'"):
        model.sample(1, 0, {"label": "normal"})
    with pytest.raises(ValueError, match=r"\['mask'\]"):
        model.sample(1, 0, {"mask": "x.png"})
    with pytest.raises(ValueError, match="power of two"):
        DCGANConfig(label="x", image_size=48)
    with pytest.raises(ValueError, match="known families: dcgan"):
        get_generator("stylegan")
    assert "dcgan" in families()


def test_resume_continues_exactly_where_it_stopped(dataset, tmp_path):
    config = dict(batch_size=4, eval_samples=4, log_every_steps=1)
    uninterrupted = tiny()
    train(uninterrupted, dataset, "consolidation", TrainConfig(epochs=3, **config), tmp_path / "a")
    first = tiny()
    train(first, dataset, "consolidation", TrainConfig(epochs=2, **config), tmp_path / "b")
    steps_after_two = first.step
    resumed = tiny()
    summary = train(resumed, dataset, "consolidation", TrainConfig(epochs=3, **config), tmp_path / "b", resume=True)
    assert resumed.epoch == 3 and resumed.step == uninterrupted.step == steps_after_two * 3 // 2
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    for key, value in uninterrupted._weights().items():
        assert torch.equal(value, resumed._weights()[key]), key


def test_checkpoints_repeat_byte_for_byte_and_the_older_two_key_form_still_loads(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sonogen.generators.base import CHECKPOINT_METADATA

    model = tiny()
    model.train_step(torch.rand(2, 1, 32, 32) * 2 - 1)
    model.save_checkpoint(tmp_path / "a.safetensors")
    model.save_checkpoint(tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        saved = json.loads(f.metadata()[CHECKPOINT_METADATA])
    old = {key: json.dumps(value) for key, value in saved.items()}  # "describe" and "param_groups", as before
    save_file(load_file(str(tmp_path / "a.safetensors")), str(tmp_path / "old.safetensors"), metadata=old)
    restored = tiny()
    restored.load_checkpoint(tmp_path / "old.safetensors")
    assert restored.step == 1 and all(torch.equal(v, model._weights()[k]) for k, v in restored._weights().items())


def test_a_log_gets_a_line_every_30_s_of_training_and_one_per_epoch(dataset, tmp_path, monkeypatch):
    import sonogen.generators.trainer as trainer

    clock = iter(range(0, 100_000, 40))  # every reading of the clock 40 s after the last
    monkeypatch.setattr(trainer.time, "monotonic", lambda: next(clock))
    lines = []
    train(tiny(), dataset, "consolidation", TrainConfig(epochs=2, batch_size=2, eval_samples=4), tmp_path / "run",
          log=lines.append)
    steps = [line for line in lines if line.startswith("epoch ")]
    epochs = [line for line in lines if line.startswith("finished epoch")]
    assert [line.split(",")[0] for line in epochs] == ["finished epoch 1/2", "finished epoch 2/2"]
    assert steps and all("loss_generator" in line and " s: " in line for line in steps)


def test_a_gan_keeps_its_best_epoch_when_the_last_one_is_worse_and_says_why(dataset, tmp_path):
    from sonogen.generators.best_epoch import Monitor

    class Readings:
        """A stand-in feature space where a reading's samples sit far, near, then farthest from the real images."""

        def __init__(self):
            self.calls, self.real = 0, None

        def __call__(self, images):
            self.calls += 1
            spread = torch.linspace(0, 1, len(images))[:, None].repeat(1, 4)
            if self.calls % 2:  # read() takes the real images first
                return spread
            return spread + {2: 1.0, 4: 0.05, 6: 3.0}[self.calls]

    config = TrainConfig(epochs=3, batch_size=4, eval_samples=4, monitor_samples=8, keep_best=True)
    summary = train(tiny(), dataset, "consolidation", config, tmp_path / "kept",
                    monitor=Monitor("test-features@1", Readings(), min_1nn=0.0, max_diversity_ratio=float("inf")))
    best = summary["best_epoch"]
    assert best["epoch"] == 2 and best["monitor"] == "test-features@1"
    assert best["reason"].startswith("epoch 2 (kmmd") and "the lowest kMMD among the epochs" in best["reason"]
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]  # it trained on, and kept epoch 2
    two = tiny()
    train(two, dataset, "consolidation", TrainConfig(epochs=2, batch_size=4, eval_samples=4, keep_best=False),
          tmp_path / "two")
    kept = load_generator(tmp_path / "kept" / "generator")
    assert kept.epoch == 2 and all(torch.equal(v, two._weights()[k]) for k, v in kept._weights().items())


def test_training_records_quality_curves(dataset, tmp_path):
    summary = train(tiny(), dataset, "consolidation", TrainConfig(epochs=2, batch_size=4, eval_samples=8),
                    tmp_path / "run")
    assert [set(h) >= {"kmmd", "one_nn_acc", "loss_generator"} for h in summary["history"]] == [True, True]
    assert 0 <= summary["final"]["one_nn_acc"] <= 1
    with pytest.raises(ValueError, match="32 px but the generator is 64 px"):
        train(tiny(64), dataset, "consolidation", TrainConfig(epochs=1), tmp_path / "bad")
    with pytest.raises(ValueError, match="pneumothorax"):
        train(tiny(), dataset, "pneumothorax", TrainConfig(epochs=1), tmp_path / "bad")


def test_a_collapsed_epoch_is_not_kept_however_low_its_kmmd():
    from sonogen.generators.best_epoch import BestEpoch, Monitor

    class Collapsed:
        def sample(self, n, seed):
            return torch.zeros(n, 1, 32, 32)  # one image, again and again

    monitor = Monitor("test-features@1", lambda images: images.flatten(1), min_1nn=0.0)
    real = torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert monitor.read(Collapsed(), real)["diversity_ratio"] > 1.5
    best = BestEpoch()
    assert best.offer(monitor, 5, {"kmmd": 0.3, "one_nn_acc": 0.9, "diversity_ratio": 1.2})
    assert not best.offer(monitor, 10, {"kmmd": 0.1, "one_nn_acc": 0.9, "diversity_ratio": 1.9})
    assert best.epoch == 5 and "diversity ratio ≤ 1.5" in best.reason

