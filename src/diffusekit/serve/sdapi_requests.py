"""AUTOMATIC1111's request bodies for /sdapi/v1/txt2img and img2img, and their translation into the native
JobRequest that requests.check_job checks (so the limits and their messages are the native API's).

As in AUTOMATIC1111, a field this server does not know is ignored, not refused; unlike it, the answer says so:
`ignored` lists every unknown field and every known one whose value asks for what diffusekit does not do
(a field left at the value that changes nothing is not listed). A field of the wrong type is a 400 naming it.
A field left out takes the model's own default (its size, steps, guidance), not AUTOMATIC1111's 512 x 512.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import ImageOps
from pydantic import BaseModel, ConfigDict

from diffusekit.images import png_bytes
from diffusekit.samplers import SAMPLER_OPTIONS
from diffusekit.serve.a1111_names import SamplerChoice, resolve
from diffusekit.serve.requests import JobRequest, Limits, RequestError, decode_upload

# the native field a check names -> the A1111 field the client sent
A1111_FIELDS = {"size": "width", "guidance": "cfg_scale", "strength": "denoising_strength", "image": "init_images", "n": "batch_size",
                "sampler": "sampler_name", "schedule": "scheduler", "model": "override_settings.sd_model_checkpoint"}
INPAINTING_FILL = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}


class A1111Request(BaseModel):
    """The fields txt2img and img2img share (AUTOMATIC1111 1.10's names and defaults)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int | None = -1
    subseed: int | None = -1
    subseed_strength: float | None = 0.0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = None
    sampler_index: str | None = None  # the old name of sampler_name, used when that is missing
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list | None = None
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] | None = None
    infotext: str | None = None


class Txt2ImgRequest(A1111Request):
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(A1111Request):
    init_images: list[str] | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur: float | None = None
    mask_blur_x: float = 4
    mask_blur_y: float = 4
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


# A1111 fields diffusekit does not act on, with the values that ask for nothing (any other value is listed as ignored)
NOT_DONE = {"styles": (None, []), "subseed_strength": (None, 0), "seed_resize_from_h": (None, -1, 0), "seed_resize_from_w": (None, -1, 0),
            "restore_faces": (None, False), "tiling": (None, False), "do_not_save_samples": (False,), "s_min_uncond": (None, 0),
            "s_churn": (None, 0), "s_tmax": (None, 0), "s_tmin": (None, 0), "s_noise": (None, 1), "refiner_checkpoint": (None, "", "None"),
            "script_name": (None, "", "None"), "script_args": (None, []), "alwayson_scripts": (None, {}), "infotext": (None, ""),
            "enable_hr": (False,), "resize_mode": (0, 1), "image_cfg_scale": (None, 1.5), "initial_noise_multiplier": (None, 1),
            "latent_mask": (None, "")}
NOT_DONE_WITH_MASK = {"inpaint_full_res": (False,), "mask_round": (True, False)}


@dataclass
class Understood:
    """What a request was taken to mean, beyond its JobRequest: the model, the sampler and scheduler, what was ignored."""

    model: str
    choice: SamplerChoice
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def requested_checkpoint(req: A1111Request) -> str | None:
    """override_settings.sd_model_checkpoint: the served model this request asks for (None: the current one)."""
    value = (req.override_settings or {}).get("sd_model_checkpoint")
    if value is not None and not isinstance(value, str):
        raise RequestError(f"override_settings.sd_model_checkpoint must be a model's title or name (a string), not {value!r:.40}",
                           "override_settings.sd_model_checkpoint")
    return value or None


def check_nested_text(req: A1111Request) -> None:
    """Every text inside the lists and objects of a request must be Unicode that UTF-8 can carry (requests.check_text
    checks the top level): the answer echoes them. A walk with a stack, as deep as the JSON parser let the body be."""
    stack = [(name, value) for name, value in {**dict(req), **(req.model_extra or {})}.items()]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            stack += [(f"{where}.{key}", item) for key, item in value.items()] + [(f"{where}.{key}", key) for key in value]
        elif isinstance(value, list):
            stack += [(f"{where}[{i}]", item) for i, item in enumerate(value)]
        elif isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                shown = where.encode("utf-8", "backslashreplace").decode()[:80]
                raise RequestError(f"field '{shown}' holds a lone surrogate, which is not text; send valid Unicode",
                                   re.split(r"[.\[]", shown)[0]) from None


def ignored_fields(req: A1111Request) -> list[str]:
    """The fields of `req` that ask for something this server does not do, and the unknown ones."""
    sent = req.model_fields_set
    rules = {**NOT_DONE, **(NOT_DONE_WITH_MASK if getattr(req, "mask", None) else {})}
    out = [name for name, neutral in rules.items() if name in sent and getattr(req, name) not in neutral]
    if req.subseed_strength:
        out.append("subseed")
    out += [f"override_settings.{key}" for key in (req.override_settings or {}) if key != "sd_model_checkpoint"]
    return out + sorted(req.model_extra or {})


def job_request(req: A1111Request, pipe, model: str, limits: Limits) -> tuple[JobRequest, Understood]:
    """The native job for an A1111 request to the served model `model` (its Pipeline `pipe`), and what was understood."""
    understood = Understood(model, resolve(req.sampler_name or req.sampler_index, req.scheduler), ignored_fields(req))
    understood.notes += understood.choice.notes
    if req.subseed not in (None, -1) or req.subseed_strength:
        understood.notes.append("subseed and subseed_strength are ignored: diffusekit has no variation seeds (an image is its seed and index)")
    for name in ("batch_size", "n_iter"):
        if getattr(req, name) < 1:
            raise RequestError(f"{name} = {getattr(req, name)}: use 1 or more (batch_size x n_iter images in all)", name)
    if req.width is not None and req.height is not None and req.width != req.height:
        raise RequestError(f"width {req.width} and height {req.height}: this model makes square images; send equal sides, "
                           f"e.g. width = height = {pipe.config.data.image_size} (its own size)", "height")
    text_model = pipe.text_encoder is not None
    guidance = req.cfg_scale if text_model else None
    if not text_model and req.cfg_scale not in (None, 1):
        understood.ignored.append("cfg_scale")
        understood.notes.append(f"cfg_scale is ignored: the model {model} takes no prompt, so there is nothing to guide towards")
    sampler = understood.choice.sampler.ours if understood.choice.sampler else pipe.config.sample.sampler
    eta = req.eta if "eta" in SAMPLER_OPTIONS.get(sampler, ()) else None  # as A1111: eta is for the samplers that take it
    fields = dict(prompt=req.prompt, negative_prompt=req.negative_prompt, model=model, steps=req.steps, guidance=guidance, eta=eta,
                  sampler=understood.choice.sampler.ours if understood.choice.sampler else None, schedule=understood.choice.scheduler.spacing,
                  seed=req.seed, size=req.width if req.width is not None else req.height, n=req.batch_size * req.n_iter)
    if isinstance(req, Img2ImgRequest):
        fields.update(edit_fields(req, limits, understood))
    return JobRequest(**fields), understood


def edit_fields(req: Img2ImgRequest, limits: Limits, understood: Understood) -> dict:
    """img2img's init image, mask and strength as JobRequest fields."""
    if not req.init_images:
        raise RequestError("img2img needs an image: send init_images, a list holding one base64 PNG, JPEG or WebP", "init_images")
    if len(req.init_images) > 1:
        understood.ignored.append("init_images[1:]")
        understood.notes.append(f"only the first of the {len(req.init_images)} init_images is used")
    fields = {"image": req.init_images[0], "strength": req.denoising_strength}
    if req.mask is None:
        return fields
    mask = req.mask
    if req.inpainting_mask_invert:
        inverted = ImageOps.invert(decode_upload(mask, "mask", limits).convert("L"))
        mask = base64.b64encode(png_bytes(inverted)).decode()
    blur = req.mask_blur if req.mask_blur is not None else req.mask_blur_x
    if req.mask_blur is None and req.mask_blur_y != req.mask_blur_x:
        understood.ignored.append("mask_blur_y")
    fill = INPAINTING_FILL.get(req.inpainting_fill)
    if fill is None:
        raise RequestError(f"inpainting_fill = {req.inpainting_fill}: use 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing)",
                           "inpainting_fill")
    if fill == "latent noise":  # the masked part starts from pure noise: strength 1
        fields["strength"] = 1.0
        understood.notes.append("inpainting_fill 2 (latent noise): the masked part starts from pure noise, so denoising_strength is 1")
    elif fill != "original":
        understood.ignored.append("inpainting_fill")
        understood.notes.append(f"inpainting_fill {req.inpainting_fill} ({fill}) is done as 1 (original): the masked part starts "
                                "from the init image noised to denoising_strength")
    return {**fields, "mask": mask, "mask_blur": blur}


def a1111_error(err: RequestError) -> RequestError:
    """A check's error with the field named as the A1111 client sent it ("size" -> "width")."""
    field_name = A1111_FIELDS.get(err.param or "")
    if field_name is None:
        return err
    label = "batch_size x n_iter" if field_name == "batch_size" else field_name
    return RequestError(f"{label}: {err.message}", field_name, err.status, err.code, err.headers)
