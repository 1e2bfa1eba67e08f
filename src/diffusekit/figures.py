"""Figures drawn with PIL alone (matplotlib is not a dependency): titled image panels in rows, a heat map over an
image, a line chart. `diffusekit explain` and `generate --attention-maps` compose their figures from these.

    rows = [[(image_rgb(x0), "x0"), (heat_overlay(x0, heat), "apple")]]
    figure = stack([panel_rows(rows, side=96), line_chart({"loss": (ts, losses)}, "loss by t", "t", "loss", log_y=True)])
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

INK, PAPER, GRID = (30, 30, 30), (255, 255, 255), (225, 225, 225)
LINE_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]
# a dark-to-bright heat scale (inferno's look): value 0 black-violet, 1 pale yellow
HEAT_ANCHORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)


def font(size: int = 11) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # a scalable font where Pillow has FreeType
    except (TypeError, OSError):
        return ImageFont.load_default()


def image_rgb(image: torch.Tensor) -> np.ndarray:
    """An image [C, H, W] in [-1, 1] (1 or 3 channels) as uint8 [H, W, 3]."""
    pixels = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels[..., :3]


def gray_rgb(values: torch.Tensor) -> np.ndarray:
    """A map [H, W] of any range as uint8 gray [H, W, 3], its minimum black and its maximum white."""
    lo, hi = float(values.min()), float(values.max())
    scaled = (values.float() - lo) / (hi - lo) if hi > lo else torch.zeros_like(values, dtype=torch.float32)
    return image_rgb(scaled[None] * 2 - 1)


def heat_rgb(heat: torch.Tensor) -> np.ndarray:
    """A map [H, W] in [0, 1] in the heat scale, uint8 [H, W, 3]."""
    position = heat.detach().float().clamp(0, 1).cpu().numpy() * (len(HEAT_ANCHORS) - 1)
    low = np.minimum(np.floor(position).astype(int), len(HEAT_ANCHORS) - 2)
    frac = (position - low)[..., None]
    return (HEAT_ANCHORS[low] * (1 - frac) + HEAT_ANCHORS[low + 1] * frac).round().astype(np.uint8)


def heat_overlay(image: torch.Tensor, heat: torch.Tensor, opacity: float = 0.65) -> np.ndarray:
    """The heat map [H, W] in [0, 1] laid over a grayed image [C, H, W] in [-1, 1], uint8 [H, W, 3]."""
    gray = image_rgb(image).astype(np.float64).mean(axis=2, keepdims=True)
    return (gray * (1 - opacity) + heat_rgb(heat).astype(np.float64) * opacity).round().astype(np.uint8)


def panel_rows(rows: list[list[tuple[np.ndarray, str]]], side: int = 96, heading: str | None = None) -> Image.Image:
    """Rows of (uint8 [H, W, 3] picture, title) panels, each picture scaled to side x side (nearest: pixels stay
    sharp), its title above it (several lines where it holds newlines; a column widens to its longest line)."""
    text, gap = font(11), 6
    lines = [line for row in rows for _, title in row for line in title.split("\n")]
    column = max(side, max((int(text.getlength(line)) + 4 for line in lines), default=0))
    title_h = max((title.count("\n") + 1 for row in rows for _, title in row), default=1) * 13 + 2
    heading_h = 18 if heading else 0
    figure = Image.new("RGB", (gap + max(len(row) for row in rows) * (column + gap), heading_h + gap + len(rows) * (title_h + side + gap)), PAPER)
    draw = ImageDraw.Draw(figure)
    if heading:
        draw.text((gap, 3), heading, fill=INK, font=font(12))
    for r, row in enumerate(rows):
        top = heading_h + gap + r * (title_h + side + gap)
        for c, (picture, title) in enumerate(row):
            left = gap + c * (column + gap)
            draw.multiline_text((left, top), title, fill=INK, font=text, spacing=1)
            figure.paste(Image.fromarray(picture).resize((side, side), Image.NEAREST), (left, top + title_h))
    return figure


def stack(figures: list[Image.Image], gap: int = 8) -> Image.Image:
    """Figures one below the other, left-aligned on white."""
    out = Image.new("RGB", (max(f.width for f in figures), sum(f.height for f in figures) + gap * (len(figures) - 1)), PAPER)
    top = 0
    for f in figures:
        out.paste(f, (0, top))
        top += f.height + gap
    return out


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round values (1, 2 or 5 times a power of ten apart) inside [lo, hi], about `count` of them."""
    raw = (hi - lo) / count
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]


def ticks(lo: float, hi: float, log: bool) -> list[float]:
    """Tick values over [lo, hi]: on a log axis the powers of ten inside it (round values where it spans less than two)."""
    if log:
        decades = [10.0**e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) if lo <= 10.0**e <= hi]
        return decades if len(decades) >= 2 else [v for v in nice_ticks(lo, hi, 4) if v > 0]
    return nice_ticks(lo, hi)


def line_chart(series: dict[str, tuple[list, list]], title: str, xlabel: str, ylabel: str, log_x: bool = False, log_y: bool = False,
               size: tuple[int, int] = (460, 300)) -> Image.Image:
    """Each named (xs, ys) as a line with dots, a legend under the title, axes with ticks; a log axis drops values <= 0."""
    points = {name: [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)
                     and (not log_x or x > 0) and (not log_y or y > 0)] for name, (xs, ys) in series.items()}
    every = [p for pts in points.values() for p in pts]
    if not every:
        raise ValueError(f"nothing to plot in {title!r}")
    text = font(11)
    w, h = size[0], size[1] + 14 * len(points)
    left, right, top, bottom = 58, 14, 26 + 14 * len(points), 36
    figure = Image.new("RGB", (w, h), PAPER)
    draw = ImageDraw.Draw(figure)

    def scale(values: list[float], log: bool) -> tuple[float, float, callable]:
        lo, hi = min(values), max(values)
        lo, hi = (lo / 1.5, hi * 1.5) if log and lo == hi else (lo - 1, hi + 1) if lo == hi else (lo, hi)
        f = math.log10 if log else float
        return lo, hi, lambda v: (f(v) - f(lo)) / (f(hi) - f(lo))

    x_lo, x_hi, fx = scale([p[0] for p in every], log_x)
    y_lo, y_hi, fy = scale([p[1] for p in every], log_y)
    to_px = lambda x, y: (left + fx(x) * (w - left - right), h - bottom - fy(y) * (h - top - bottom))  # noqa: E731
    for v in ticks(x_lo, x_hi, log_x):
        x, _ = to_px(v, y_lo)
        draw.line([(x, top), (x, h - bottom)], fill=GRID)
        draw.text((x, h - bottom + 4), f"{v:.3g}", fill=INK, font=text, anchor="ma")
    for v in ticks(y_lo, y_hi, log_y):
        _, y = to_px(x_lo, v)
        draw.line([(left, y), (w - right, y)], fill=GRID)
        draw.text((left - 4, y), f"{v:.3g}", fill=INK, font=text, anchor="rm")
    draw.rectangle([left, top, w - right, h - bottom], outline=INK)
    draw.text((6, 5), title, fill=INK, font=font(12))
    draw.text(((left + w - right) / 2, h - 16), xlabel + (" (log)" if log_x else ""), fill=INK, font=text, anchor="ma")
    label = ylabel + (" (log)" if log_y else "")
    upright = Image.new("RGB", (int(text.getlength(label)) + 4, 14), PAPER)
    ImageDraw.Draw(upright).text((2, 0), label, fill=INK, font=text)
    figure.paste(upright.rotate(90, expand=True), (2, int((top + h - bottom) / 2 - upright.width / 2)))
    for i, (name, pts) in enumerate(points.items()):
        color = LINE_COLORS[i % len(LINE_COLORS)]
        xy = [to_px(x, y) for x, y in sorted(pts)]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for x, y in xy if len(xy) <= 40 else []:  # dots where they mark measurements, not along a dense curve
            draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=color)
        legend_y = 24 + 14 * i
        draw.line([(left, legend_y + 7), (left + 16, legend_y + 7)], fill=color, width=2)
        draw.text((left + 20, legend_y), name, fill=INK, font=text)
    return figure
