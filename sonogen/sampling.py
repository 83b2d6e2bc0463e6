"""Torch-free sampling helpers shared by torch training and the ONNX Runtime server: seeded Gaussian latents,
the [-1, 1] → uint8 image conversion, PNG encoding, and the decoding of picture conditions in requests.

Image ``i`` of a seed gets its own stream, ``SeedSequence([seed, i])``, so an image does not depend on how many
were drawn with it or in which batch, and torch is not needed to reproduce it.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from typing import Any

import numpy as np


def gaussian_latents(seed: int, n: int, dim: int, start: int = 0) -> np.ndarray:
    """Latents ``(n, dim)`` float32 of images ``start .. start + n - 1`` of ``seed``."""
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return np.stack([
        np.random.default_rng([seed, index]).standard_normal(dim, dtype=np.float32)
        for index in range(start, start + n)
    ])


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of the ``chunk``-th request when a client splits a large draw: chunk 0 keeps ``seed`` (so a
    request that fits in one chunk is the same draw), later chunks get independent seeds derived from it."""
    if chunk == 0:
        return seed
    high, low = np.random.SeedSequence([seed, chunk]).generate_state(2, np.uint32)
    return ((int(high) << 32) | int(low)) & (2**63 - 1)


def to_uint8(images: Any) -> np.ndarray:
    """Images ``(N, 1, H, W)`` in [-1, 1], a numpy array or a torch tensor (on any device), as uint8 ``(N, H, W)``."""
    if hasattr(images, "detach"):  # a torch tensor, converted where it is (this module imports no torch: the serve
        # image has none); the same float32 operations as below, so the same bytes
        return images.detach()[:, 0].float().clamp(-1, 1).add(1).mul(127.5).round().byte().cpu().numpy()
    scaled = (np.clip(images[:, 0].astype(np.float32), -1, 1) + np.float32(1)) * np.float32(127.5)
    return np.rint(scaled).astype(np.uint8)


def tile(pixels: np.ndarray, columns: int = 8, border: int = 2) -> np.ndarray:
    """uint8 images ``(N, H, W)`` or ``(N, H, W, 3)`` as one grid of ``columns`` per row, with ``border`` black
    pixels around and between the tiles."""
    n, h, w = pixels.shape[:3]
    rows = (n + columns - 1) // columns
    grid = np.zeros((rows * (h + border) + border, columns * (w + border) + border, *pixels.shape[3:]), np.uint8)
    for k in range(n):
        r, c = divmod(k, columns)
        grid[border + r * (h + border): border + r * (h + border) + h,
             border + c * (w + border): border + c * (w + border) + w] = pixels[k]
    return grid


def png_bytes(image: np.ndarray) -> bytes:
    """One uint8 ``(H, W)`` image as a greyscale PNG; the same pixels always give the same bytes."""
    # written here rather than by Pillow, which tries all five row filters on every row: that search costs more
    # than compressing. One filter for every row (Sub: each byte minus its left neighbour) at zlib level 1 encodes
    # a 256 px ultrasound frame ~2× faster into a file no larger, and encoding is most of the endpoint's own cost.
    height, width = image.shape
    rows = np.empty((height, width + 1), np.uint8)
    rows[:, 0] = 1  # the Sub filter type byte that starts each row
    rows[:, 1] = image[:, 0]
    np.subtract(image[:, 1:], image[:, :-1], out=rows[:, 2:])  # uint8 arithmetic wraps modulo 256, as PNG wants

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale, deflate, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 1))
            + chunk(b"IEND", b""))


def decode_png(value: Any, size: int, field: str) -> np.ndarray:
    """A picture condition, a base64 PNG or an array, as a ``(size, size)`` array; errors name ``field``."""
    if isinstance(value, str):
        from PIL import Image

        try:
            image = Image.open(io.BytesIO(base64.b64decode(value, validate=True)))
            wrong_size = image.size != (size, size)  # read from the header, before any pixels are decoded
            value = None if wrong_size else np.asarray(image.convert("L"))
        except Exception:  # noqa: BLE001  (every decoding failure is the caller's bad input)
            raise ValueError(f"{field} must be a base64-encoded PNG") from None
        if wrong_size:
            raise ValueError(f"{field} is {image.size[0]}×{image.size[1]} px; this model samples {size}×{size}")
    array = np.asarray(value).squeeze()
    if array.shape != (size, size):
        raise ValueError(f"{field} has shape {array.shape}; this model samples {size}×{size}")
    return array
