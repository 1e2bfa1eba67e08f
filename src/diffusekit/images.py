"""Pictures at the edges: tensors in [-1, 1] to grids, PNG folders and GIF animations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusekit.data import to_uint8
from diffusekit.files import atomic_write


def make_grid(images: torch.Tensor, ncols: int | None = None, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> one uint8 image [rows*H, cols*W, C] with padding between tiles."""
    n, c, h, w = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c), pad_value, dtype=np.uint8)
    tiles = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
    for i, tile in enumerate(tiles):
        r, col = divmod(i, ncols)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = tile
    return grid


def to_pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def upscale(image: Image.Image, min_side: int) -> Image.Image:
    """Nearest-neighbour enlargement so that tiny images (28 px digits) are visible."""
    factor = max(1, math.ceil(min_side / min(image.size)))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST) if factor > 1 else image


def atomic_save(image: Image.Image, path: str | Path, **kwargs) -> Path:
    """Save a PIL image atomically (files.atomic_write); the format follows the file name unless given."""
    path = Path(path)
    image_format = kwargs.pop("format", None) or Image.registered_extensions().get(path.suffix.lower())
    return atomic_write(path, lambda tmp: image.save(tmp, format=image_format, **kwargs), sync=False)


def save_grid(images: torch.Tensor, path: str | Path, ncols: int | None = None, min_side: int = 256) -> Path:
    return atomic_save(upscale(to_pil(make_grid(images, ncols)), min_side), path)


def save_images(images: torch.Tensor, folder: str | Path, prefix: str = "sample", start: int = 0) -> list[Path]:
    """One PNG per image: folder/prefix_00000.png, ..."""
    arrays = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
    return [atomic_save(to_pil(a), Path(folder) / f"{prefix}_{start + i:05d}.png") for i, a in enumerate(arrays)]


def save_gif(frames: list[torch.Tensor], path: str | Path, ncols: int | None = None, duration_ms: int = 60, hold_last_ms: int = 1500, min_side: int = 256) -> Path:
    """An animation of image batches (each [N, C, H, W] in [-1, 1]), one grid per frame."""
    if not frames:
        raise ValueError("no frames to animate")
    pictures = [upscale(to_pil(make_grid(f, ncols)), min_side).convert("RGB") for f in frames]
    durations = [duration_ms] * (len(pictures) - 1) + [hold_last_ms]
    return atomic_save(pictures[0], path, format="GIF", save_all=True, append_images=pictures[1:], duration=durations, loop=0)
