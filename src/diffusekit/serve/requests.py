"""What a client may ask for: the request bodies, the server's limits, and their check into the keyword
arguments of Pipeline.__call__. Every refusal is a RequestError that names the field and the fix; the
app answers it as one JSON error ({"error": {"message", "type", "param", "code"}}, OpenAI's shape)."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import secrets
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from diffusekit.attention_maps import AttentionCollector
from diffusekit.config_checks import MAX_SEED
from diffusekit.errors import UserError
from diffusekit.images import mask_tensor, open_image
from diffusekit.inpaint import default_strength, strength_start
from diffusekit.models import size_multiple
from diffusekit.nn.attention_recorder import cross_attention_layers
from diffusekit.samplers import SAMPLERS
from diffusekit.schedule import SPACINGS


@dataclass
class Limits:
    """Bounds on every request (most are the `diffusekit serve` options of the same names); GET /api/models lists them."""

    max_prompt_chars: int = 1000
    max_n: int = 8
    max_steps: int = 100
    max_size: int = 0  # pixels; 0: four times the model's own size
    max_upload_bytes: int = 8 * 2**20  # one uploaded image, encoded
    max_upload_pixels: int = 2048 * 2048  # one uploaded image, decoded (larger ones are refused before decoding)
    max_jump_n_sample: int = 4
    max_guidance: float = 30.0
    max_eta: float = 1.0  # DDIM's eta: 0 deterministic, 1 the DDPM posterior

    def body_bytes(self) -> int:
        """The largest request body: an image, a mask and two control images in base64 (4/3 of their size) and the rest."""
        return 6 * self.max_upload_bytes + 2**16

    def size_limit(self, config) -> int:
        return self.max_size or 4 * config.data.image_size


class RequestError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str = "invalid_value", headers: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.headers = message, param, status, code, headers or {}

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class ControlRequest(BaseModel):
    """One ControlNet's control in a job (serve/control_requests.py checks it); numbers must be JSON numbers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)
    image: str = Field(description="the control image, base64 (a data: URL works): white lines on black for edges and scribbles")
    controlnet: str | None = Field(None, description="the ControlNet's name (GET /api/models); may be left out when the model has one")
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    annotator: Literal["none", "canny", "scribble"] = "none"


class AnnotateRequest(BaseModel):
    """POST /api/annotate: an image's Canny edges or scribble, as a job's control would use them."""

    model_config = ConfigDict(extra="forbid", strict=True)
    image: str
    annotator: Literal["none", "canny", "scribble"] = "canny"
    size: int | None = Field(None, description="the job's output size (the image's centre square resized to it); default the image's")


class JobRequest(BaseModel):
    """POST /api/jobs: a generation, an image-to-image or an inpainting job."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    prompt: str = ""
    negative_prompt: str = ""
    model: str | None = None
    sampler: str | None = None
    schedule: str | None = None
    steps: int | None = None
    guidance: float | None = None
    guidance_rescale: float | None = None
    eta: float | None = None
    seed: int | None = Field(None, description="None or -1: a random seed")
    index: int = Field(0, description="the index of the first image in the seed's sequence")
    size: int | None = None
    n: int = 1
    image: str | None = Field(None, description="the init image, base64 (a data: URL works): PNG, JPEG or WebP")
    mask: str | None = Field(None, description="the inpainting mask, base64, the init image's size: white = repaint")
    strength: float | None = None
    mask_blur: float = 0.0
    jump_length: int = 10
    jump_n_sample: int = 1
    animate: bool = False
    attention: bool = Field(False, description="a text-to-image job's cross-attention maps, one per token of the prompt")
    control: list[ControlRequest] | None = Field(None, description="ControlNets' control images and settings (control_requests.py)")


class OpenAIImageRequest(BaseModel):
    """POST /v1/images/generations, as OpenAI's Images API takes it (plus seed, negative_prompt, steps, guidance)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    prompt: str = Field(min_length=1)
    n: int = 1
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    model: str | None = None
    seed: int | None = None
    negative_prompt: str = ""
    steps: int | None = None
    guidance: float | None = None
    quality: str | None = None  # OpenAI's; accepted and ignored
    style: str | None = None
    user: str | None = None
    output_format: Literal["png"] | None = None

    def job_fields(self) -> dict:
        size = None
        if self.size not in (None, "auto"):
            match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", self.size)
            if not match:
                raise RequestError(f"size '{self.size}' is not WIDTHxHEIGHT; send e.g. \"32x32\" (or leave it out: the model's own size)", "size")
            width, height = int(match[1]), int(match[2])
            if width != height:
                raise RequestError(f"size {self.size}: this model makes square images; send equal sides, e.g. {width}x{width}", "size")
            size = width
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "model": self.model, "seed": self.seed, "n": self.n,
                "size": size, "steps": self.steps, "guidance": self.guidance}


MAX_NUMBER_DIGITS = 100  # far more than any field takes, far less than Python's int-string limit


def _json_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_NUMBER_DIGITS:
        raise RequestError(f"the body holds a number of {digits} digits ({text[:20]}...); no field takes more than {MAX_NUMBER_DIGITS}",
                           code="invalid_json")
    return int(text)


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RequestError(f"the number {text[:40]} is too large for any field; send a finite number", code="invalid_json")
    return value


def _json_constant(name: str):
    raise RequestError(f"{name} is not a JSON number; send a finite number", code="invalid_json")


def check_text(data: dict) -> None:
    """Every field name and text value must be Unicode that UTF-8 can carry (no lone surrogate such as "\\ud800")."""
    for key, value in data.items():
        for text in (key, value):
            if isinstance(text, str) and not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as err:
                    field = key.encode("utf-8", "backslashreplace").decode()
                    raise RequestError(f"field '{field[:60]}' holds a lone surrogate ({text[err.start]!r}), which is not text; "
                                       "send valid Unicode", field) from None


def parse_body(raw: bytes, kind: type[BaseModel]) -> BaseModel:
    """A JSON body into `kind`; the first problem as a RequestError naming the field."""
    try:
        data = json.loads(raw, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(f"the request body is not JSON ({err}); send a JSON object with Content-Type: application/json", code="invalid_json") from None
    except RecursionError:
        raise RequestError("the request body is nested too deeply; send a flat JSON object, e.g. {\"prompt\": \"red apple\"}",
                           code="invalid_json") from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object, e.g. {\"prompt\": \"red apple\"}", code="invalid_json")
    check_text(data)
    try:
        return kind.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        if first["type"] == "extra_forbidden":
            known = ", ".join(kind.model_fields)
            raise RequestError(f"unknown field '{field}'; the fields are: {known}", field, code="unknown_field") from None
        raise RequestError(f"field '{field}': {first['msg']} (got {first.get('input')!r:.80})", field) from None


def mib(size: int) -> str:
    return f"{size / 2**20:.3g} MiB"


def _check(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise RequestError(message, param)


def _check_range(value: float | None, largest: float, param: str, meaning: str) -> None:
    _check(value is None or 0 <= value <= largest, f"{param} = {value}: use 0 to {largest:g} ({meaning}; the server's limit)", param)


def decode_upload(data: str, what: str, limits: Limits):
    """A base64 image (optionally a data: URL) into a PIL image, within the upload limits."""
    _, comma, payload = data.partition(",") if data.startswith("data:") else ("", ",", data)
    _check(bool(comma), f"the {what} is a data: URL without a comma; send data:image/png;base64,<the file's bytes in base64>", what)
    _check(len(payload) * 3 // 4 <= limits.max_upload_bytes, f"the {what} is larger than the {mib(limits.max_upload_bytes)} allowed; "
           "send a smaller image", what)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"the {what} is not base64; send the file's bytes base64-encoded (a data:image/png;base64,... URL works)", what) from None
    try:
        return open_image(raw, what, limits.max_upload_pixels)
    except UserError as err:
        raise RequestError(f"{err}; send a PNG, JPEG or WebP image", what) from None


def check_size(size: int | None, config, limits: Limits) -> int:
    """The image size asked for (None: the model's own), or a RequestError listing the sizes this model makes here."""
    multiple, largest = size_multiple(config), limits.size_limit(config)
    size = size if size is not None else config.data.image_size
    sizes = ", ".join(str(s) for s in range(multiple, largest + 1, multiple)[:12])
    _check(size % multiple == 0 and multiple <= size <= largest, f"size = {size}: this model makes sizes that are multiples of {multiple}, "
           f"up to {largest} here; use one of: {sizes}", "size")
    return size


def check_attention(pipe, prompt: str) -> bool:
    """"attention": true needs a model with cross-attention and one prompt with words (attention_maps.py's checks)."""
    _check(bool(cross_attention_layers(pipe.net)), f"the model {pipe.name} has no cross-attention (it is not text-to-image), so it has "
           "no attention maps; drop \"attention\" or choose a text-to-image model", "attention")
    try:
        AttentionCollector(pipe, prompt)
    except UserError as err:
        raise RequestError(f"attention: {err}", "attention") from None
    return True


def check_job(req: JobRequest, pipe, limits: Limits, name: str = "") -> tuple[dict, int]:
    """(the keyword arguments of pipe(...), the seed) for a request, or a RequestError naming the field."""
    config = pipe.config
    for name in ("prompt", "negative_prompt"):
        text = getattr(req, name)
        _check(len(text) <= limits.max_prompt_chars, f"{name} has {len(text)} characters, more than the {limits.max_prompt_chars} allowed; shorten it", name)
    text_model = pipe.text_encoder is not None
    _check(text_model or not (req.prompt or req.negative_prompt), f"the model {name or pipe.name} is not text-conditioned: it takes no prompt; "
           "send an empty prompt or choose a text-to-image model", "prompt")
    _check(1 <= req.n <= limits.max_n, f"n = {req.n}: ask for 1 to {limits.max_n} images", "n")
    _check(req.sampler is None or req.sampler in SAMPLERS, f"unknown sampler '{req.sampler}'; use one of: {', '.join(SAMPLERS)}", "sampler")
    _check(req.schedule is None or req.schedule in SPACINGS, f"unknown schedule '{req.schedule}'; use one of: {', '.join(SPACINGS)}", "schedule")
    steps = req.steps if req.steps is not None else min(config.sample.steps, limits.max_steps)
    _check(1 <= steps <= limits.max_steps, f"steps = {steps}: use 1 to {limits.max_steps} steps", "steps")
    seed = secrets.randbelow(2**32) if req.seed in (None, -1) else req.seed
    _check(0 <= seed <= MAX_SEED, f"seed = {seed}: a seed is a whole number from 0 to {MAX_SEED} (or -1 / null: random)", "seed")
    _check_range(req.guidance, limits.max_guidance, "guidance", "1: no guidance")
    _check_range(req.eta, limits.max_eta, "eta", "0: deterministic")
    _check(0 <= req.index <= 2**31, f"index = {req.index}: use a whole number from 0 to {2**31}", "index")
    size = check_size(req.size, config, limits)
    call = {"prompt": req.prompt if text_model else None, "n": req.n, "negative": req.negative_prompt or None, "steps": steps,
            "sampler": req.sampler, "spacing": req.schedule, "guidance": req.guidance, "guidance_rescale": req.guidance_rescale,
            "eta": req.eta, "seed": seed, "size": size, "first_index": req.index}
    if req.attention:
        call["return_attention"] = check_attention(pipe, req.prompt)
    try:  # the model's own checks of the sampling settings, now rather than in the worker
        settings = pipe.settings(**{k: call[k] for k in ("n", "steps", "sampler", "spacing", "seed", "guidance", "guidance_rescale", "eta")})
        pipe.sampler_options(settings, req.eta, None)
    except UserError as err:
        raise RequestError(str(err)) from None
    if req.image is None:
        _check(req.mask is None and req.strength is None, "mask and strength need an init image: send image as well", "image")
        return call, seed
    image = decode_upload(req.image, "image", limits)
    call.update(image=image, strength=req.strength, jump_length=req.jump_length, jump_n_sample=req.jump_n_sample)
    try:
        strength_start(steps, default_strength(req.strength, req.mask is not None))
    except UserError as err:
        raise RequestError(str(err), "strength") from None
    _check(1 <= req.jump_n_sample <= limits.max_jump_n_sample, f"jump_n_sample = {req.jump_n_sample}: use 1 (no resampling) to "
           f"{limits.max_jump_n_sample}", "jump_n_sample")
    _check(1 <= req.jump_length <= 1000, f"jump_length = {req.jump_length}: use 1 to 1000 steps between jumps", "jump_length")
    if req.mask is not None:
        _check(0 <= req.mask_blur <= 64, f"mask_blur = {req.mask_blur}: use 0 to 64 pixels", "mask_blur")
        mask = decode_upload(req.mask, "mask", limits)
        try:
            mask_tensor(mask, image, size)  # the size check, now
        except UserError as err:
            raise RequestError(str(err), "mask") from None
        call.update(mask_image=mask, mask_blur=req.mask_blur)
    return call, seed
