"""Decoding stills and videos into grey frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from sonogen.data.writer import SkipFile

STILL_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mpeg", ".mpg", ".mov", ".m4v", ".mkv", ".webm", ".gif"})
# the largest ultrasound frames (4K screen captures, 8.3 Mpx) with room; larger ones are refused from their header,
# before a decoder allocates them (a 140 KB PNG can declare 144 Mpx)
MAX_PIXELS = 16_000_000


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise SkipFile(f"{width}x{height} = {width * height / 1e6:.1f} Mpx, over the {max_pixels / 1e6:g} Mpx limit "
                       f"(--max-pixels)")


def to_grey(array: np.ndarray) -> np.ndarray:
    """Luminance (ITU-R BT.601 weights) of an RGB(A) or grey array, as uint8.

    Tinted ultrasound (purple or blue colour maps) keeps its echo structure in luminance; taking one channel
    would not.
    """
    if array.ndim == 2:
        grey = array.astype(np.float64)
        if array.dtype != np.uint8:
            top = float(grey.max()) or 1.0
            grey = grey * (255.0 / top)
        return np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    rgb = array[..., :3].astype(np.float64)
    if array.dtype != np.uint8:
        rgb *= 255.0 / (float(rgb.max()) or 1.0)
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)


def _check_nonempty(path: Path) -> None:
    if path.stat().st_size == 0:
        raise SkipFile("empty file")


def read_still(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    path = Path(path)
    _check_nonempty(path)
    with Image.open(path) as im:
        check_pixels(*im.size, max_pixels)  # from the header: nothing is decoded yet
        im.load()  # decodes fully here so a truncated file fails now, not later
        if im.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "1"):
            im = im.convert("RGB")
        array = np.asarray(im)
    return to_grey(array)


class FrameSampler:
    """Decides, frame by frame, which frames to keep so that ``fps`` frames are kept per second of video time.

    The first frame is always kept; later ones are the first at or after each ``k / fps`` seconds from it.
    """

    def __init__(self, fps: float):
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.step = 1.0 / fps
        self.next_time: float | None = None

    def keep(self, time: float) -> bool:
        if self.next_time is None:
            self.next_time = time
        if time + 1e-6 < self.next_time:
            return False
        while self.next_time <= time + 1e-6:
            self.next_time += self.step
        return True


def read_video(path: str | Path, fps: float, max_pixels: int = MAX_PIXELS) -> list[tuple[int, np.ndarray]]:
    """Frames sampled at ``fps`` per second of video time, as ``(frame_index, grey)`` pairs.

    Uses the container's timestamps, so variable-rate GIFs are sampled by time, not by frame count.
    """
    import av

    sampler = FrameSampler(fps)
    path = Path(path)
    _check_nonempty(path)
    frames: list[tuple[int, np.ndarray]] = []
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise SkipFile("no video stream")
        stream = container.streams.video[0]
        check_pixels(stream.codec_context.width, stream.codec_context.height, max_pixels)
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        for index, frame in enumerate(container.decode(stream)):
            if sampler.keep(frame.time if frame.time is not None else index / rate):
                frames.append((index, frame.to_ndarray(format="gray").copy()))
    return frames
