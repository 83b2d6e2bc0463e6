"""The plain-torch ResNet-34 / FID Inception-v3: exact weight-file layouts, loading from disk and S3, features."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sonogen.metrics.backbones import build_backbone, load_weights

# Parameter counts (weights and biases; BatchNorm running statistics are buffers, not parameters):
# - resnet34: 21,797,672, the `num_params` torchvision's docs list for ResNet34_Weights.IMAGENET1K_V1.
# - FID Inception: torchvision's docs list 27,161,264 for inception_v3 (with its AuxLogits head, 1000 classes).
#   pytorch-fid builds it with aux_logits=False and 1008 classes, so subtract AuxLogits (conv0 768·128 + 2·128,
#   conv1 128·768·25 + 2·768, fc 768·1000 + 1000 = 3,326,696) and add 8 classes (8·2048 + 8 = 16,392).
RESNET34_PARAMS = 21_797_672
FID_INCEPTION_PARAMS = 27_161_264 - 3_326_696 + 16_392  # = 23,850,960


def _bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    stats = ("weight", "bias", "running_mean", "running_var")
    return {f"{prefix}.{name}": (channels,) for name in stats} | {f"{prefix}.num_batches_tracked": ()}


def resnet34_layout() -> dict[str, tuple[int, ...]]:
    """torchvision's resnet34 state_dict: BasicBlocks (3, 4, 6, 3), a 1×1 projection where a stage starts."""
    layout = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    cin = 64
    for stage, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for i in range(blocks):
            block = f"layer{stage}.{i}"
            layout[f"{block}.conv1.weight"] = (width, cin if i == 0 else width, 3, 3)
            layout[f"{block}.conv2.weight"] = (width, width, 3, 3)
            layout |= _bn(f"{block}.bn1", width) | _bn(f"{block}.bn2", width)
            if i == 0 and stage > 1:
                layout[f"{block}.downsample.0.weight"] = (width, cin, 1, 1)
                layout |= _bn(f"{block}.downsample.1", width)
        cin = width
    return layout | {"fc.weight": (1000, 512), "fc.bias": (1000,)}


def fid_inception_layout() -> dict[str, tuple[int, ...]]:
    """pytorch-fid's pt_inception-2015-12-05 file: every BasicConv2d as (out, in, kh, kw), 1008-class fc."""
    convs = {"Conv2d_1a_3x3": (32, 3, 3, 3), "Conv2d_2a_3x3": (32, 32, 3, 3), "Conv2d_2b_3x3": (64, 32, 3, 3),
             "Conv2d_3b_1x1": (80, 64, 1, 1), "Conv2d_4a_3x3": (192, 80, 3, 3)}

    def block(name, **shapes):
        convs.update({f"{name}.{branch}": shape for branch, shape in shapes.items()})

    for name, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        block(name, branch1x1=(64, cin, 1, 1), branch5x5_1=(48, cin, 1, 1), branch5x5_2=(64, 48, 5, 5),
              branch3x3dbl_1=(64, cin, 1, 1), branch3x3dbl_2=(96, 64, 3, 3), branch3x3dbl_3=(96, 96, 3, 3),
              branch_pool=(pool, cin, 1, 1))
    block("Mixed_6a", branch3x3=(384, 288, 3, 3), branch3x3dbl_1=(64, 288, 1, 1), branch3x3dbl_2=(96, 64, 3, 3),
          branch3x3dbl_3=(96, 96, 3, 3))
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        block(name, branch1x1=(192, 768, 1, 1), branch7x7_1=(c7, 768, 1, 1), branch7x7_2=(c7, c7, 1, 7),
              branch7x7_3=(192, c7, 7, 1), branch7x7dbl_1=(c7, 768, 1, 1), branch7x7dbl_2=(c7, c7, 7, 1),
              branch7x7dbl_3=(c7, c7, 1, 7), branch7x7dbl_4=(c7, c7, 7, 1), branch7x7dbl_5=(192, c7, 1, 7),
              branch_pool=(192, 768, 1, 1))
    block("Mixed_7a", branch3x3_1=(192, 768, 1, 1), branch3x3_2=(320, 192, 3, 3), branch7x7x3_1=(192, 768, 1, 1),
          branch7x7x3_2=(192, 192, 1, 7), branch7x7x3_3=(192, 192, 7, 1), branch7x7x3_4=(192, 192, 3, 3))
    for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        block(name, branch1x1=(320, cin, 1, 1), branch3x3_1=(384, cin, 1, 1), branch3x3_2a=(384, 384, 1, 3),
              branch3x3_2b=(384, 384, 3, 1), branch3x3dbl_1=(448, cin, 1, 1), branch3x3dbl_2=(384, 448, 3, 3),
              branch3x3dbl_3a=(384, 384, 1, 3), branch3x3dbl_3b=(384, 384, 3, 1), branch_pool=(192, cin, 1, 1))
    layout = {}
    for name, shape in convs.items():
        layout |= {f"{name}.conv.weight": shape} | _bn(f"{name}.bn", shape[0])
    return layout | {"fc.weight": (1008, 2048), "fc.bias": (1008,)}


LAYOUTS = {"resnet34": (resnet34_layout, RESNET34_PARAMS, 512),
           "inception-v3": (fid_inception_layout, FID_INCEPTION_PARAMS, 2048)}


def random_state(name: str) -> dict[str, torch.Tensor]:
    """Every float entry random (running_var kept positive), so a load that drops anything changes the features."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, value in build_backbone(name).state_dict().items():
        if value.is_floating_point():
            value = torch.randn(value.shape, generator=generator) * (0.05 if value.dim() > 1 else 0.5)
            value = value.abs() + 0.5 if key.endswith("running_var") else value
        state[key] = value.contiguous()
    return state


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    # grey sonogen-like images in [-1, 1], smaller than either network's input size
    return torch.rand(2, 1, 64, 80, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def backbone(request):
    """(name, random weights) — drawn once per network."""
    name = request.param
    state = random_state(name)
    return name, state


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_state_dict_layout_matches_the_weight_files(name):
    layout_fn, params, _ = LAYOUTS[name]
    expected = layout_fn()
    model = build_backbone(name)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert sum(math.prod(s) for k, s in expected.items() if k.endswith(("weight", "bias"))) == params
    assert sum(p.numel() for p in model.parameters()) == params
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_feature_shapes_and_finite_on_grey_input(backbone, images):
    name, state = backbone
    model = build_backbone(name, state)
    with torch.no_grad():
        features, feature_map = model.features(images), model.feature_map(images)
    assert features.shape == (2, LAYOUTS[name][2])
    assert feature_map.shape == ((2, 64, 73, 73) if name == "inception-v3" else (2, 64, 56, 56))
    assert torch.isfinite(features).all() and torch.isfinite(feature_map).all()
    assert torch.equal(model(images), features)
    # grey input is the same as the grey image repeated on three channels
    assert torch.allclose(model.features(images.repeat(1, 3, 1, 1)), features)


def test_pth_is_refused_and_converted_once_it_loads_as_safetensors(backbone, images, tmp_path):
    from sonogen.weights import convert_to_safetensors

    name, state = backbone
    with torch.no_grad():
        reference = build_backbone(name, state).features(images)
        torch.save(state, tmp_path / "weights.pth")
        with pytest.raises(ValueError, match="sonogen convert-weights"):
            load_weights(tmp_path / "weights.pth")
        assert convert_to_safetensors(tmp_path / "weights.pth") == [tmp_path / "weights.safetensors"]
        loaded = load_weights(tmp_path / "weights.safetensors")
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
        assert torch.equal(build_backbone(name, str(tmp_path / "weights.safetensors")).features(images), reference)


def test_files_without_batchnorm_counters_load(tmp_path):
    # weight files saved before torch 0.4.1 (the original torchvision ones among them) have no such buffer
    state = {k: v for k, v in random_state("resnet34").items() if not k.endswith("num_batches_tracked")}
    save_file(state, str(tmp_path / "legacy.safetensors"))
    model = build_backbone("resnet34", str(tmp_path / "legacy.safetensors"))
    assert torch.equal(model.state_dict()["layer1.0.bn1.running_var"], state["layer1.0.bn1.running_var"])


def test_fid_pooling_quirks():
    model = build_backbone("inception-v3")
    x = torch.rand(1, 1280, 8, 8, generator=torch.Generator().manual_seed(2)) + 0.5
    with torch.no_grad():
        mixed_7b = model.Mixed_7b(x)[:, -192:]  # the pool branch comes last
        assert torch.allclose(mixed_7b, model.Mixed_7b.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)))
        assert not torch.allclose(mixed_7b, model.Mixed_7b.branch_pool(F.avg_pool2d(x, 3, 1, 1)))
        y = model.Mixed_7b(x)
        mixed_7c = model.Mixed_7c(y)[:, -192:]
        assert torch.allclose(mixed_7c, model.Mixed_7c.branch_pool(F.max_pool2d(y, 3, 1, 1)))


def test_mismatched_weights_name_the_keys(tmp_path):
    state = random_state("resnet34")
    state["head.weight"] = state.pop("fc.weight")
    with pytest.raises(ValueError, match=r"missing \['fc.weight'\].*unexpected \['head.weight'\]"):
        build_backbone("resnet34", state)
    inception = random_state("inception-v3")
    inception["fc.weight"], inception["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)  # torchvision's head
    with pytest.raises(ValueError, match=r"2 mis-shaped \['fc.bias"):
        build_backbone("inception-v3", inception)


def test_unknown_backbone_and_missing_or_unsafe_files(tmp_path):
    from sonogen.weights import convert_to_safetensors

    with pytest.raises(ValueError, match="known: inception-v3, resnet34"):
        build_backbone("vgg16", None)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_weights(tmp_path / "nowhere.pth")
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        build_backbone("resnet34", str(tmp_path / "nowhere.safetensors"))
    (tmp_path / "weights.onnx").write_bytes(b"\0")
    with pytest.raises(ValueError, match="unsupported weights format"):
        load_weights(tmp_path / "weights.onnx")
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "checkpoint.pth")
    with pytest.raises(ValueError, match="not a flat state_dict"):
        convert_to_safetensors(tmp_path / "checkpoint.pth")
    torch.save({"w": torch.zeros(1), "obj": Exploit()}, tmp_path / "pickle.pth")
    with pytest.raises(ValueError, match="sonogen convert-weights"):
        load_weights(tmp_path / "pickle.pth")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        convert_to_safetensors(tmp_path / "pickle.pth")  # even converting never runs what a file names
    assert not Exploit.ran


class Exploit:
    """An arbitrary object in a .pth: weights_only loading must refuse it rather than unpickle it."""

    ran = False

    def __reduce__(self):
        return (Exploit._run, ())

    @staticmethod
    def _run():
        Exploit.ran = True


@pytest.fixture
def s3(s3_server, aws_env):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)
    if "sonogen-weights" not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket="sonogen-weights")
    return client


@pytest.mark.parametrize("endpoint_var", ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"])
def test_load_weights_from_s3(s3, s3_server, monkeypatch, tmp_path, endpoint_var):
    monkeypatch.setenv(endpoint_var, s3_server)
    state = {"conv.weight": torch.randn(4, 3, 3, 3), "bn.num_batches_tracked": torch.tensor(7)}
    save_file(state, str(tmp_path / "small.safetensors"))
    s3.upload_file(str(tmp_path / "small.safetensors"), "sonogen-weights", f"{endpoint_var}/small.safetensors")
    loaded = load_weights(f"s3://sonogen-weights/{endpoint_var}/small.safetensors")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_build_backbone_from_s3(s3, s3_server, monkeypatch, tmp_path, images):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    state = random_state("resnet34")
    save_file(state, str(tmp_path / "resnet34.safetensors"))
    s3.upload_file(str(tmp_path / "resnet34.safetensors"), "sonogen-weights", "backbones/resnet34.safetensors")
    with torch.no_grad():
        assert torch.equal(build_backbone("resnet34", "s3://sonogen-weights/backbones/resnet34.safetensors")
                           .features(images), build_backbone("resnet34", state).features(images))


def test_missing_s3_object(s3, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    with pytest.raises(FileNotFoundError, match="s3://sonogen-weights/absent.pth"):
        load_weights("s3://sonogen-weights/absent.pth")
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket/w.pth"):
        load_weights("s3://no-such-bucket/w.pth")
