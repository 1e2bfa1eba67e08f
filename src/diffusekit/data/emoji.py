"""The built-in `emoji` dataset: the emoji of the Noto Color Emoji font, captioned with their names.

Every fully-qualified emoji that the `emoji` package knows (Unicode's RGI list) and
that the font draws as one glyph is rendered with Pillow on a white background and
captioned with its CLDR short name in lower case ("red apple", "flag: japan",
"family: man, woman, boy" is written "family man woman boy"). Skin-tone variants are
left out (they would make about a third of the set near-copies of a few hundred
people); so are Unicode's components (bare skin tones, hair styles) and emoji newer
than the font, which it has no glyph for.

The font is a CBDT bitmap font: FreeType draws it only at its bitmap size 109
(with `embedded_color=True`), so each emoji is drawn at 136 x 136 px, composited on
white, then shrunk with a Lanczos filter. With libraqm (Pillow's complex layout)
the font's ligatures give flags, keycaps and ZWJ sequences; without it only single
code points render as one glyph, and the rest are left out.

The rendering is cached (uint8 tensor in safetensors, captions in JSON) under
$DIFFUSEKIT_CACHE (default ~/.cache/diffusekit)/emoji, keyed by the font file's size
and mtime, the image size, the `emoji` package version and the renderer version.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, features
from tqdm.auto import tqdm

from diffusekit.errors import UserError
from diffusekit.files import cache_dir, read_cached_tensors, save_tensors_atomic, write_json_atomic

DEBIAN_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_ENV = "DIFFUSEKIT_EMOJI_FONT"
BITMAP_SIZE = 109  # the one size at which FreeType draws the font's CBDT bitmaps
REFERENCE_EMOJI = "\U0001f600"  # grinning face: its box is the font's emoji cell
RENDER_VERSION = 1  # bump when the rendering changes, so that old caches are not read
SKIN_TONES = range(0x1F3FB, 0x1F400)
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
TAG_CHARACTERS = range(0xE0020, 0xE0080)  # subdivision flags: black flag + tag letters (England, Scotland, Wales)
MAX_SIZE = 136  # the glyphs' own size; larger images would only be blurred copies


# ----------------------------------------------------------------------------- the font


def find_font(font: str | Path | None = None) -> Path:
    """The font file: the `font` argument, else $DIFFUSEKIT_EMOJI_FONT, else the Debian package's path."""
    path = Path(font or os.environ.get(FONT_ENV) or DEBIAN_FONT)
    if not path.is_file():
        raise UserError(
            f"the emoji dataset needs the Noto Color Emoji font, and '{path}' is not a file. "
            f"Install it (apt-get install fonts-noto-color-emoji, which puts it at {DEBIAN_FONT}) "
            f"or give the path of NotoColorEmoji.ttf (the font argument or the {FONT_ENV} environment variable)"
        )
    return path


def open_font(path: Path) -> ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype(str(path), BITMAP_SIZE)
    except OSError as err:
        raise UserError(f"cannot open '{path}' as the Noto Color Emoji font at size {BITMAP_SIZE} ({err}); give the path of NotoColorEmoji.ttf") from None


def cell_size(font: ImageFont.FreeTypeFont) -> int:
    """Side of the square every emoji is drawn in: the larger side of a typical emoji's box (136 px)."""
    left, top, right, bottom = font.getbbox(REFERENCE_EMOJI)
    return max(right - left, bottom - top)


# ----------------------------------------------------------------------------- names


def emoji_table():
    try:
        import emoji
    except ImportError:
        raise UserError("the emoji dataset takes its emoji names from the `emoji` package: pip install emoji") from None
    return emoji


def is_flag(sequence: str) -> bool:
    codes = [ord(c) for c in sequence]
    return all(c in REGIONAL_INDICATORS for c in codes) or (codes[0] == 0x1F3F4 and any(c in TAG_CHARACTERS for c in codes))


def caption(sequence: str, name: str) -> str:
    """':red_apple:' -> 'red apple'; country and region flags get CLDR's 'flag: ' prefix."""
    words = name.strip(":").replace("_", " ").replace("\u2019", "'").lower()
    return f"flag: {words}" if is_flag(sequence) else words


def emoji_names() -> list[tuple[str, str]]:
    """(sequence, caption) of every fully-qualified emoji without a skin tone, sorted by caption."""
    emoji = emoji_table()
    fully_qualified = emoji.STATUS["fully_qualified"]
    pairs = [
        (sequence, caption(sequence, data["en"]))
        for sequence, data in emoji.EMOJI_DATA.items()
        if data["status"] == fully_qualified and not any(ord(c) in SKIN_TONES for c in sequence)
    ]
    return sorted(pairs, key=lambda pair: (pair[1], pair[0]))


# ----------------------------------------------------------------------------- rendering


def has_one_glyph(font: ImageFont.FreeTypeFont, sequence: str, cell: int) -> bool:
    """Whether the font draws `sequence` as one non-empty glyph (a cheap check, without drawing).

    A missing code point gets an empty box; a sequence the font has no ligature for lays out as
    several glyphs side by side, wider than one cell.
    """
    left, top, right, bottom = font.getbbox(sequence)
    return bottom > top and 0 < right - left <= cell


def render_emoji(sequence: str, size: int, font: ImageFont.FreeTypeFont) -> np.ndarray | None:
    """uint8 [3, size, size]: one emoji centred on white; None where the font draws nothing for it."""
    cell = cell_size(font)
    if not has_one_glyph(font, sequence, cell):
        return None
    left, top, right, bottom = font.getbbox(sequence)
    glyph = Image.new("RGBA", (cell, cell), (255, 255, 255, 0))
    origin = ((cell - (right - left)) / 2 - left, (cell - (bottom - top)) / 2 - top)
    ImageDraw.Draw(glyph).text(origin, sequence, font=font, embedded_color=True)
    if glyph.getchannel("A").getbbox() is None:
        return None
    # composite before shrinking, so that transparent pixels count as white in the filter
    on_white = Image.alpha_composite(Image.new("RGBA", glyph.size, (255, 255, 255, 255)), glyph).convert("RGB")
    shrunk = on_white.resize((size, size), Image.Resampling.LANCZOS)
    return np.array(shrunk, dtype=np.uint8).transpose(2, 0, 1)


def evenly_spaced(items: list, count: int) -> list:
    """`count` items spread over the list (all of them when count is 0 or too large)."""
    if not count or count >= len(items):
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


def render_all(font_path: Path, size: int, limit: int, progress: bool) -> tuple[torch.Tensor, list[str], list[str]]:
    """(images uint8 [N, 3, size, size], captions, sequences) of the emoji the font draws."""
    font = open_font(font_path)
    cell = cell_size(font)
    drawable = [pair for pair in emoji_names() if has_one_glyph(font, pair[0], cell)]
    images, captions, sequences = [], [], []
    for sequence, text in tqdm(evenly_spaced(drawable, limit), desc="rendering emoji", unit="emoji", disable=not progress, file=sys.stderr):
        image = render_emoji(sequence, size, font)
        if image is not None:
            images.append(image)
            captions.append(text)
            sequences.append(sequence)
    if not images:
        raise UserError(f"the font '{font_path}' drew none of the emoji; check that it is NotoColorEmoji.ttf")
    return torch.from_numpy(np.stack(images)), captions, sequences


# ----------------------------------------------------------------------------- the cache


def cache_path(font_path: Path, size: int, limit: int) -> Path:
    """Cache file (.safetensors; captions beside it in .json) for this font file, size and subset."""
    stat = font_path.stat()
    parts = [str(stat.st_size), str(stat.st_mtime_ns), emoji_table().__version__, str(RENDER_VERSION), str(features.check("raqm"))]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return cache_dir() / "emoji" / f"emoji-{size}px-{limit or 'all'}-{key}.safetensors"


def read_cache(path: Path) -> tuple[torch.Tensor, list[str]] | None:
    captions_path = path.with_suffix(".json")
    if not (path.is_file() and captions_path.is_file()):
        return None
    cached = read_cached_tensors(path)
    try:
        captions = json.loads(captions_path.read_text())["captions"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    if cached is None or "images" not in cached or len(captions) != len(cached["images"]):
        return None  # damaged or stale: rendered again
    return cached["images"], captions


def write_cache(path: Path, images: torch.Tensor, captions: list[str], sequences: list[str], seconds: float) -> None:
    """Captions first, then the tensor by atomic rename: a cache with a tensor file is always complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path.with_suffix(".json"), {"captions": captions, "sequences": sequences, "render_seconds": round(seconds, 2)})
    save_tensors_atomic({"images": images}, path)


def load_emoji(size: int = 32, font: str | Path | None = None, limit: int = 0, progress: bool = True) -> tuple[torch.Tensor, list[str]]:
    """(images uint8 [N, 3, size, size] on white, captions); `limit` > 0 takes that many, evenly spread.

    The first call renders (a few seconds for all ~1,900) and caches; later calls read the cache.
    """
    if not 1 <= size <= MAX_SIZE:
        raise UserError(f"emoji image size {size} is out of range: the font's glyphs are {MAX_SIZE} px, so use 1 to {MAX_SIZE} (e.g. 32 or 64)")
    font_path = find_font(font)
    path = cache_path(font_path, size, limit)
    cached = read_cache(path)
    if cached is not None:
        return cached
    start = time.perf_counter()
    images, captions, sequences = render_all(font_path, size, limit, progress)
    write_cache(path, images, captions, sequences, time.perf_counter() - start)
    return images, captions
