"""The studio's "inside" view, server side: the served model's noise schedule for some sampling settings
(GET /api/models/{name}/schedule), the live previews of a sampling step (x0_hat and the noisy x_t) and a finished
job's attention maps (one small PNG heat map per image and token), all as JSON-ready values. The numbers come
from the library (process_view.py, attention_maps.py); here they are checked and encoded for the page."""

from __future__ import annotations

import base64

import numpy as np
import torch
from PIL import Image

from diffusekit.errors import UserError
from diffusekit.figures import heat_rgb
from diffusekit.images import make_grid, png_bytes, to_pil
from diffusekit.process_view import noisy_preview, schedule_curves
from diffusekit.schedule import SPACINGS
from diffusekit.serve.requests import Limits, RequestError, check_size

MAX_MAP_SIDE = 64  # pixels: a larger image's maps are sent smaller (the page stretches them over it; they are smooth anyway)
HEAT_OPACITY = 0.65  # how much a token's map covers its image (figures.heat_overlay's default; the page grays the image below)


def png_url(picture: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(picture)).decode()


def images_url(images: torch.Tensor) -> str:
    """Images [B, C, H, W] in [-1, 1] side by side as one PNG data URL."""
    return png_url(to_pil(make_grid(images, padding=0)))


def step_previews(pipe, info: dict) -> dict:
    """A sampler step's batch as the page's two live previews: "preview" its x0_hat, "noisy" its current x_t."""
    return {"preview": images_url(pipe.preview(info)), "noisy": images_url(noisy_preview(pipe, info))}


def heat_png(heat: torch.Tensor) -> Image.Image:
    """A map [H, W] in [0, 1] as an RGBA picture to lay over its (grayed) image: figures.heat_overlay's colours and opacity."""
    alpha = np.full(heat.shape, round(HEAT_OPACITY * 255), dtype=np.uint8)
    picture = Image.fromarray(np.dstack([heat_rgb(heat), alpha]), "RGBA")
    side = max(picture.size)
    return picture if side <= MAX_MAP_SIDE else picture.resize((MAX_MAP_SIDE, MAX_MAP_SIDE), Image.Resampling.BILINEAR)


def attention_summary(attention) -> dict:
    """An attention_maps.AttentionMaps as {"tokens": [...], "maps": [[one PNG data URL per token] per image]}."""
    return {"tokens": attention.tokens, "maps": [[png_url(heat_png(heat)) for heat in image_maps] for image_maps in attention.maps]}


def schedule_answer(pipe, limits: Limits, steps: int | None, schedule: str | None, size: int | None) -> dict:
    """GET /api/models/{name}/schedule: process_view.schedule_curves for these settings (None: the model's own),
    each bad value a RequestError naming its query parameter."""
    timesteps = pipe.schedule.num_timesteps
    if steps is not None and steps > timesteps:
        raise RequestError(f"steps = {steps}: this model has {timesteps} timesteps, so use 1 to {min(timesteps, limits.max_steps)}", "steps")
    if steps is None:
        steps = min(pipe.config.sample.steps, limits.max_steps)
    if schedule is not None and schedule not in SPACINGS:
        raise RequestError(f"unknown schedule '{schedule[:40]}'; use one of: {', '.join(SPACINGS)}", "schedule")
    size = check_size(size, pipe.config, limits)
    try:
        return {"model": pipe.name, "size": size, **schedule_curves(pipe, steps, schedule, size)}
    except UserError as err:  # a spacing this process does not offer (flow matching has no "leading")
        raise RequestError(str(err), "schedule") from None
