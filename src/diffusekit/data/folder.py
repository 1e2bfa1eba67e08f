"""A folder of the user's images (PNG, JPEG, WebP; searched recursively).

Each image is converted to RGB or grayscale (transparency composited on white),
its shorter side resized to the target size and the centre cropped. An unreadable
file is reported by path and skipped (and counted), or aborts the load, by option.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from diffusekit.errors import UserError, warn

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def find_images(root: Path) -> list[Path]:
    if not root.exists():
        raise UserError(f"image folder '{root}' does not exist; check data.path (e.g. --set data.path=my_images/)")
    if not root.is_dir():
        raise UserError(f"data.path '{root}' is a file, not a folder; give the folder that holds the images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"image folder '{root}' holds no PNG, JPEG or WebP images (searched recursively); add images or fix data.path")
    return files


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """RGB or L; an alpha channel is composited on white; 16-bit grayscale is scaled to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit PNGs; convert("L") would clip at 255
        image = Image.fromarray((np.asarray(image, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("L" if channels == 1 else "RGB")


MAX_INPUT_PIXELS = 4096 * 4096  # an init image or mask handed to `edit` or the server; a training image: PIL's own limit
MAX_INPUT_SIDE = 8192  # likewise
MAX_INPUT_ASPECT = 8  # the longer side at most this many times the shorter (only the centre square is used)


def check_input_size(width: int, height: int, what: str = "image", max_pixels: int = MAX_INPUT_PIXELS, max_side: int | None = MAX_INPUT_SIDE) -> None:
    """A UserError unless an image handed to us is at most `max_pixels`, `max_side` a side (None: any) and MAX_INPUT_ASPECT : 1,
    so that neither decoding nor resizing it can take much memory (read from the header, before any pixel is decoded)."""
    shape = f"the {what} is {width}x{height} pixels"
    if width * height > max_pixels:
        raise UserError(f"{shape}, more than the {max_pixels} allowed; shrink it first")
    if max_side is not None and max(width, height) > max_side:
        raise UserError(f"{shape}: a side is longer than the {max_side} allowed; shrink it first")
    if max(width, height) > MAX_INPUT_ASPECT * min(width, height):
        raise UserError(f"{shape}: one side is more than {MAX_INPUT_ASPECT} times the other (only its centre square is used); "
                        "crop it closer to a square first")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """The centre square of `image` resized to size x size, in one resize of that region (PIL's box): no
    intermediate image larger than the input or the output."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side), reducing_gap=None)


def load_image(path: Path, size: int, channels: int) -> np.ndarray:
    """uint8 array [C, size, size]; raises UserError naming the file if it cannot be read or is absurdly shaped."""
    try:
        with Image.open(path) as image:
            check_input_size(image.width, image.height, f"image '{path}'", Image.MAX_IMAGE_PIXELS or MAX_INPUT_PIXELS, max_side=None)
            image.load()
            image = resize_center_crop(to_mode(image, channels), size)
    except Image.DecompressionBombError as err:
        raise UserError(f"refusing image '{path}': {err} (PIL's limit against decompression bombs, Image.MAX_IMAGE_PIXELS); "
                        "shrink the image first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise UserError(f"cannot read image '{path}': {err}") from None
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def load_folder(root: str | Path, size: int, channels: int, bad_images: str = "skip", limit: int = 0, progress: bool = True):
    """(images uint8 [N, C, size, size], relative file names, number skipped)."""
    root = Path(root)
    files = find_images(root)
    if limit:
        files = files[:limit]
    arrays, names, skipped = [], [], 0
    for path in tqdm(files, desc="loading images", unit="img", disable=not progress or len(files) < 200, file=sys.stderr):
        try:
            arrays.append(load_image(path, size, channels))
            names.append(str(path.relative_to(root)))
        except UserError as err:
            if bad_images == "abort":
                raise UserError(f"{err}. Remove or replace the file, or set data.bad_images=skip to skip unreadable images") from None
            skipped += 1
            warn(f"skipping unreadable image {path} ({err})")
    if not arrays:
        raise UserError(f"none of the {len(files)} image files in '{root}' could be read; check that they are valid PNG/JPEG/WebP files")
    if skipped:
        warn(f"skipped {skipped} unreadable image(s) of {len(files)} in {root}")
    return torch.from_numpy(np.stack(arrays)), names, skipped


def metadata_files(root: Path) -> list[Path]:
    """Every metadata.jsonl in the folder and its subfolders (each one's file_name values are relative to its own folder)."""
    return sorted(p for p in root.rglob("metadata.jsonl") if p.is_file())


def read_metadata(root: Path, files: list[Path]) -> dict[str, str]:
    """{image path relative to root: caption} from the metadata.jsonl `files` under root (the Hugging Face imagefolder
    convention, lines of {"file_name": ..., "text": ...}); a listed file that does not exist is a UserError naming it and its metadata.jsonl."""
    texts, missing = {}, {}
    for metadata in files:
        for number, raw in enumerate(metadata.read_bytes().splitlines(), 1):
            line = decode_caption(raw, f"{metadata} line {number}")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                listed, text = metadata.parent / Path(record["file_name"]), str(record["text"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise UserError(f"{metadata} line {number} is not a JSON object with \"file_name\" and \"text\"; fix or remove that line") from None
            if not listed.is_file():
                missing.setdefault(metadata, []).append(str(record["file_name"]))
            texts[os.path.relpath(listed, root)] = text
    if missing:
        count, (first, names) = sum(map(len, missing.values())), next(iter(missing.items()))
        raise UserError(f"{count} image file(s) listed in metadata.jsonl are missing: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''} "
                        f"(listed in {first}{f' and {len(missing) - 1} more metadata.jsonl' if len(missing) > 1 else ''}); "
                        "add the images or remove their lines")
    return texts


def read_captions(root: str | Path, names: list[str]) -> list[str] | None:
    """Captions for the images `names` (relative paths): from the metadata.jsonl files (read_metadata) or from
    sidecar .txt files (photo.png -> photo.txt). None when the folder has neither; "" for an image without one."""
    root = Path(root)
    files = metadata_files(root)  # one walk of the folder
    if files:
        texts = read_metadata(root, files)
        return [texts.get(os.path.normpath(name), "") for name in names]
    sidecars = [(root / name).with_suffix(".txt") for name in names]
    if not any(p.is_file() for p in sidecars):
        return None
    return [decode_caption(p.read_bytes(), str(p)).strip() if p.is_file() else "" for p in sidecars]


def describe_captions(root: str | Path, count: int, captions: list[str] | None) -> str:
    """One line on the images read and their captions, e.g. "read 8 images from data: 8 captioned, from 2 metadata.jsonl files"."""
    sources = len(metadata_files(Path(root)))
    where = f"{sources} metadata.jsonl file{'s' if sources != 1 else ''}" if sources else ".txt files beside them"
    captioned = sum(bool(c) for c in captions or [])
    said = f"{captioned} captioned, from {where}" if captions is not None else "no captions (no metadata.jsonl, no .txt beside the images)"
    return f"read {count} images from {root}: {said}" + (f"; {count - captioned} without a caption" if captions and captioned < count else "")


def decode_caption(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{where} is not UTF-8 text (byte {err.start}: {raw[err.start:err.start + 1]!r}); save the captions as UTF-8") from None
