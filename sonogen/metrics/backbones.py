"""ImageNet backbones for the feature metrics, written in plain torch so no torchvision / pytorch-fid is needed.

Module and parameter names follow torchvision's ``resnet34`` and pytorch-fid's FID Inception-v3 exactly, so their
published weight files (``resnet34-*.pth``, ``pt_inception-2015-12-05-*.pth``) load with ``strict=True``. The
weights are never bundled: pass a local path or an ``s3://`` URI.

Both networks take sonogen images ``(N, 1, H, W)`` in [-1, 1] (3-channel input is accepted as well).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sonogen.weights import PICKLE_SUFFIXES, pickle_refused


def _as_rgb(x: Tensor, size: int, antialias: bool = False) -> Tensor:
    """Grey → 3 identical channels, bilinearly resized to the network's training resolution."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1 or 3, H, W), got shape {tuple(x.shape)}")
    x = x.float().expand(-1, 3, -1, -1)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        # a projection only where the shape changes: torchvision files have `downsample.*` keys exactly there
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + shortcut)


class ResNet34(nn.Module):
    """torchvision's ``resnet34``; ``features`` gives the 512-d pooled vector, ``feature_map`` the layer1 map."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        stages, cin = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stages.append(nn.Sequential(*(BasicBlock(cin if i == 0 else width, width, stride if i == 0 else 1)
                                          for i in range(blocks))))
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(512, num_classes)  # unused for features; kept so the ImageNet file loads strictly
        # non-persistent: they must follow .to(device) but stay out of the state_dict the weight files define
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def _stem(self, x: Tensor) -> Tensor:
        # [-1, 1] → [0, 1] → ImageNet statistics, at the 224 px the weights were trained on; antialiased like
        # torchvision's own Resize (it only matters when shrinking), but no centre crop: it would cut the scan fan
        x = (_as_rgb(x, 224, antialias=True) + 1) / 2
        x = F.relu(self.bn1(self.conv1((x - self.mean) / self.std)))
        return F.max_pool2d(x, 3, 2, 1)

    def feature_map(self, x: Tensor) -> Tensor:
        """``(N, 64, 56, 56)``: the layer1 output, local texture at 1/4 resolution (the SinGAN-style SIFID depth)."""
        return self.layer1(self._stem(x))

    def features(self, x: Tensor) -> Tensor:
        x = self.layer4(self.layer3(self.layer2(self.feature_map(x))))
        return x.mean(dim=(2, 3))

    forward = features


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)  # the TensorFlow original's epsilon

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: Tensor) -> Tensor:
    # TensorFlow's SAME-padded average pool divides by the real (unpadded) window size; pytorch-fid matches it
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def _chain(x: Tensor, *layers: nn.Module) -> Tensor:
    for layer in layers:
        x = layer(x)
    return x


class InceptionA(nn.Module):  # Mixed_5b/c/d, 35×35
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1, self.branch_pool = BasicConv2d(cin, 64, 1), BasicConv2d(cin, pool_features, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv2d(cin, 48, 1), BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = BasicConv2d(cin, 64, 1), BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1x1(x), _chain(x, self.branch5x5_1, self.branch5x5_2),
                          _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a: 35×35 → 17×17
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3, self.branch3x3dbl_1 = BasicConv2d(cin, 384, 3, stride=2), BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = BasicConv2d(64, 96, 3, padding=1), BasicConv2d(96, 96, 3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch3x3(x), _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):  # Mixed_6b..e, 17×17, 7×7 convolutions factorised into 1×7 and 7×1
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1, self.branch_pool = BasicConv2d(cin, 192, 1), BasicConv2d(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = BasicConv2d(cin, c7, 1), BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = BasicConv2d(cin, c7, 1), BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = BasicConv2d(c7, c7, **row), BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)

    def forward(self, x: Tensor) -> Tensor:
        dbl = (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5)
        return torch.cat([self.branch1x1(x), _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                          _chain(x, *dbl), self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a: 17×17 → 8×8
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv2d(cin, 192, 1), BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1, self.branch7x7x3_4 = BasicConv2d(cin, 192, 1), BasicConv2d(192, 192, 3, stride=2)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))

    def forward(self, x: Tensor) -> Tensor:
        b7 = _chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4)
        return torch.cat([_chain(x, self.branch3x3_1, self.branch3x3_2), b7, F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):  # Mixed_7b/c, 8×8, each 3×3 path ends in parallel 1×3 and 3×1 heads
    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        # The TF graph behind the FID weights max-pools in Mixed_7c's pool branch (pytorch-fid's FIDInceptionE_2),
        # unlike the paper; FID values are only comparable with that quirk reproduced.
        self.max_pool = max_pool
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.branch1x1, self.branch_pool = BasicConv2d(cin, 320, 1), BasicConv2d(cin, 192, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = BasicConv2d(384, 384, **row), BasicConv2d(384, 384, **col)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = BasicConv2d(cin, 448, 1), BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = BasicConv2d(384, 384, **row), BasicConv2d(384, 384, **col)

    def forward(self, x: Tensor) -> Tensor:
        b3, d3 = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3), self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's Inception-v3 (TF 2015-12-05 graph, 1008 classes, no aux head).

    ``features``: the 2048-d pool3 vector used by FID. ``feature_map``: ``(N, 64, 73, 73)``, the output of the first
    max-pool (before Conv2d_3b and the second max-pool) — pytorch-fid's 64-dim block 0, which is where SinGAN's
    SIFID reads its statistics: shallow enough to describe local texture of a single image, and with 73×73 positions
    per image there are enough samples for a 64×64 covariance.
    """

    def __init__(self, num_classes: int = 1008) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, num_classes)  # unused for features; kept so the weight file loads strictly

    def feature_map(self, x: Tensor) -> Tensor:
        # as pytorch-fid: plain bilinear to 299 (no antialias); it then maps [0, 1] to [-1, 1], where sonogen
        # images already are
        return F.max_pool2d(_chain(_as_rgb(x, 299), self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3), 3, 2)

    def features(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(_chain(self.feature_map(x), self.Conv2d_3b_1x1, self.Conv2d_4a_3x3), 3, 2)
        x = _chain(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                   self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)
        return x.mean(dim=(2, 3))

    forward = features


BACKBONES: dict[str, type[nn.Module]] = {"resnet34": ResNet34, "inception-v3": FIDInceptionV3}


def _download_s3(uri: str, folder: Path) -> Path:
    import boto3
    from botocore.exceptions import ClientError

    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket or not key:
        raise ValueError(f"expected s3://bucket/key, got {uri!r}")
    # boto3 reads these itself in recent versions; passing them keeps older botocore and moto setups working
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    target = folder / Path(key).name
    try:
        boto3.client("s3", endpoint_url=endpoint).download_file(bucket, key, str(target))
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NoSuchBucket"):
            raise FileNotFoundError(f"weights file not found: {uri}") from error
        raise
    return target


def _read(path: Path, source: str) -> dict[str, Tensor]:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise pickle_refused(path, f"a {suffix} file from {source}")
    if suffix != ".safetensors":
        raise ValueError(f"unsupported weights format {suffix!r} in {source}; use .safetensors")
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def load_weights(source: str | os.PathLike) -> dict[str, Tensor]:
    """A state_dict from a local ``.safetensors`` file or an ``s3://bucket/key`` URI (pickle files are refused:
    ``sonogen convert-weights`` converts them)."""
    source = str(source)
    if source.startswith("s3://"):
        with tempfile.TemporaryDirectory(prefix="sonogen-weights-") as folder:
            return _read(_download_s3(source, Path(folder)), source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {source}")
    return _read(path, source)


def _load_checked(model: nn.Module, state: Mapping[str, Tensor], name: str) -> None:
    expected, state = model.state_dict(), dict(state)
    for key, value in expected.items():
        # files saved before torch 0.4.1 have no BatchNorm step counter; eval never reads it, so zero is safe
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = [f"{k} {tuple(state[k].shape)}≠{tuple(expected[k].shape)}"
             for k in sorted(expected.keys() & state.keys()) if state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"weights do not fit {name}: {len(missing)} missing {missing[:5]}, "
                         f"{len(unexpected)} unexpected {unexpected[:5]}, {len(wrong)} mis-shaped {wrong[:5]}")
    model.load_state_dict(state, strict=True)


def build_backbone(name: str, weights: str | os.PathLike | Mapping[str, Tensor] | None = None) -> nn.Module:
    """An eval-mode, frozen backbone; ``weights``: a path, an ``s3://`` URI or a loaded state_dict.
    Without weights it is randomly initialised: fine for tests, meaningless as a metric."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    model = BACKBONES[name]()
    if weights is not None:
        state = weights if isinstance(weights, Mapping) else load_weights(weights)
        _load_checked(model, state, name)
    return model.eval().requires_grad_(False)
