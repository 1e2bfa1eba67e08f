"""Pictures at the edges: tensors in [-1, 1] to grids, PNG folders and GIF animations; the parameters
a PNG carries (AUTOMATIC1111's "parameters" text chunk) and images handed to us, read safely."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, PngImagePlugin, UnidentifiedImageError

from diffusekit.config_checks import check_mask_blur
from diffusekit.data import to_float, to_uint8
from diffusekit.data.folder import MAX_INPUT_PIXELS, check_input_size, resize_center_crop, to_mode
from diffusekit.errors import UserError
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


def save_grid(images: torch.Tensor, path: str | Path, ncols: int | None = None, min_side: int = 256, parameters: str | None = None) -> Path:
    return atomic_save(upscale(to_pil(make_grid(images, ncols)), min_side), path, **png_options(path, parameters))


def image_paths(folder: str | Path, start: int, n: int, prefix: str = "sample") -> list[Path]:
    """The files save_images writes for images start .. start + n - 1: folder/prefix_00000.png, ..."""
    return [Path(folder) / f"{prefix}_{start + i:05d}.png" for i in range(n)]


def save_images(images: torch.Tensor, folder: str | Path, prefix: str = "sample", start: int = 0, parameters: list[str] | None = None) -> list[Path]:
    """One PNG per image (image_paths), each with its own parameters text where given."""
    arrays = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
    paths = image_paths(folder, start, len(arrays), prefix)
    return [atomic_save(to_pil(a), path, **png_options(path, parameters[i] if parameters else None)) for i, (a, path) in enumerate(zip(arrays, paths))]


def gif_bytes(frames: list[torch.Tensor], ncols: int | None = None, duration_ms: int = 60, hold_last_ms: int = 1500, min_side: int = 256) -> bytes:
    """An animation of image batches (each [N, C, H, W] in [-1, 1]), one grid per frame, as GIF bytes."""
    if not frames:
        raise ValueError("no frames to animate")
    pictures = [upscale(to_pil(make_grid(f, ncols)), min_side).convert("RGB") for f in frames]
    durations = [duration_ms] * (len(pictures) - 1) + [hold_last_ms]
    buffer = io.BytesIO()
    pictures[0].save(buffer, format="GIF", save_all=True, append_images=pictures[1:], duration=durations, loop=0)
    return buffer.getvalue()


def save_gif(frames: list[torch.Tensor], path: str | Path, **options) -> Path:
    data = gif_bytes(frames, **options)
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), sync=False)


# ----------------------------------------------------------------------------- parameters in PNGs
# AUTOMATIC1111's layout, which its UI, ComfyUI, civitai and exif tools read:
#   the prompt (one or more lines)
#   Negative prompt: the negative prompt
#   Steps: 20, Sampler: dpmpp_2m, CFG scale: 3, Seed: 5, Size: 32x32, Model hash: 0123456789, Model: emoji-t2i, Version: diffusekit 0.1.0

PARAMETERS_KEY = "parameters"
_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's re_param


def _quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',\n:"') else text


def format_parameters(prompt: str, negative: str, fields: dict) -> str:
    """The "parameters" text of an image: prompt, negative prompt and the `fields` (None values left out)."""
    lines = [prompt] + ([f"Negative prompt: {negative}"] if negative else [])
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


def _value(text: str):
    if text.startswith('"'):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_parameters(text: str) -> dict:
    """A "parameters" text back into {"prompt", "negative", and each field}: numbers as numbers."""
    lines = text.strip("\n").split("\n")
    fields = {}
    if lines and len(_FIELD.findall(lines[-1])) >= 3:  # A1111 takes a last line of 3 or more fields as the fields
        fields = {key.strip(): _value(value.strip()) for key, value in _FIELD.findall(lines.pop())}
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return {"prompt": "\n".join(prompt), "negative": "\n".join(negative), **fields}


def png_options(path: str | Path | None, parameters: str | None) -> dict:
    """PIL save options that put `parameters` in a PNG's text chunk (nothing for other formats or no text)."""
    if parameters is None or (path is not None and Path(path).suffix.lower() != ".png"):
        return {}
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, parameters)  # PIL writes iTXt (UTF-8) where latin-1 cannot hold the text
    return {"pnginfo": info}


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **png_options(None, parameters))
    return buffer.getvalue()


def read_parameters(path: str | Path) -> dict:
    """The parsed parameters of an image file diffusekit (or AUTOMATIC1111) wrote."""
    try:
        with Image.open(path) as image:
            text = image.info.get(PARAMETERS_KEY)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f"cannot read image '{path}': {err}") from None
    if not isinstance(text, str):
        raise UserError(f"'{path}' carries no generation parameters (no \"{PARAMETERS_KEY}\" text chunk); only PNGs that "
                        "diffusekit generate / sample / edit / serve (or AUTOMATIC1111) wrote have them")
    return {"text": text, **parse_parameters(text)}


# ----------------------------------------------------------------------------- images handed to us

def open_image(source: str | Path | bytes, what: str = "image", max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """A PNG, JPEG or WebP file or its bytes, decoded only after its header passes check_input_size
    (so a decompression bomb or a long thin strip is refused without being unpacked); a UserError naming `what` otherwise."""
    data = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        image = Image.open(data, formats=["PNG", "JPEG", "WEBP"])
        check_input_size(image.width, image.height, what, max_pixels)
        image.load()
    except UnidentifiedImageError:
        raise UserError(f"the {what} is not a PNG, JPEG or WebP image") from None
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError) as err:
        raise UserError(f"cannot read the {what}: {err}") from None
    return image


def image_tensor(image: Image.Image, size: int, channels: int) -> torch.Tensor:
    """[1, C, size, size] in [-1, 1]: converted (alpha on white), its centre square resized to `size`."""
    array = np.asarray(resize_center_crop(to_mode(image, channels), size), dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return to_float(torch.from_numpy(array.copy()))[None]


def mask_tensor(mask: Image.Image, image: Image.Image, size: int, blur: float = 0.0) -> torch.Tensor:
    """[1, 1, size, size] in [0, 1], 1 (white) = repaint: the mask cropped and resized as `image` is, then
    blurred (a Gaussian of `blur` pixels at the output size: a feathered edge). It must match the image's size."""
    if mask.size != image.size:
        raise UserError(f"the mask is {mask.width}x{mask.height} pixels but the image is {image.width}x{image.height}; "
                        "draw the mask on the image itself, at its size")
    blur = check_mask_blur(blur)
    if mask.mode in ("RGBA", "LA", "PA") or "transparency" in mask.info:  # a painted layer: transparent = keep (black)
        rgba = mask.convert("RGBA")
        mask = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    gray = resize_center_crop(mask.convert("L"), size)
    if blur > 0:
        gray = gray.filter(ImageFilter.GaussianBlur(blur))
    return torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0)[None, None]
