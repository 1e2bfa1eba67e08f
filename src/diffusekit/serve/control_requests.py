"""The studio's ControlNets: a native job's `control` entries checked into Pipeline's control arguments, and
POST /api/annotate (an image's Canny edges or scribble, to see before generating). Every refusal is a RequestError
naming the field (control.0.scale, control.0.image, ...).

    "control": [{"image": "<base64 PNG>", "controlnet": "edges", "scale": 1.0, "start": 0.0, "end": 1.0, "annotator": "canny"}]

A control image is centre-cropped and resized to the job's output size (with a note in the job's result) and then,
if asked, annotated at that size, as training annotates its images; /api/annotate with the job's size shows exactly
what the ControlNet will see.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from diffusekit.annotators import annotate
from diffusekit.data.folder import resize_center_crop
from diffusekit.errors import UserError
from diffusekit.images import png_bytes
from diffusekit.serve.requests import AnnotateRequest, ControlRequest, Limits, RequestError, decode_upload

MAX_CONTROL_SCALE = 2.0  # AUTOMATIC1111's ControlNet extension's slider ends at 2 too


def _check(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise RequestError(message, param)


def control_picture(image: Image.Image, annotator: str, size: int, field: str) -> Image.Image:
    """The RGB control image at size x size (centre square resized), run through the annotator unless it is "none"."""
    picture = resize_center_crop(image.convert("RGB"), size)
    if annotator == "none":
        return picture
    array = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)[None]
    try:
        lines = annotate(array, annotator)[0]
    except UserError as err:  # OpenCV missing
        raise RequestError(str(err), field, status=501, code="not_available") from None
    return Image.fromarray(lines.permute(1, 2, 0).numpy())


def check_controls(controls: list[ControlRequest] | None, pipe, limits: Limits, size: int) -> tuple[dict, list[str]]:
    """(Pipeline's control keyword arguments, notes for the job's result) of a job's control entries."""
    if not controls:
        return {}, []
    loaded = list(pipe.controlnets)
    _check(bool(loaded), f"the model {pipe.name} has no ControlNet; drop \"control\", or start the server with --controlnet RUN_OR_FOLDER "
           "(GET /api/models lists each model's ControlNets)", "control")
    images, notes, settings = {}, [], {"controlnet_conditioning_scale": [], "control_guidance_start": [], "control_guidance_end": [],
                                        "control_module": []}
    for i, entry in enumerate(controls):
        field = f"control.{i}"
        _check(entry.controlnet is not None or len(loaded) == 1, f"the model {pipe.name} has {len(loaded)} ControlNets ({', '.join(loaded)}); "
               f"name the one this control steers in {field}.controlnet", f"{field}.controlnet")
        name = entry.controlnet if entry.controlnet is not None else loaded[0]
        _check(name in loaded, f"no ControlNet {name!r:.60} on the model {pipe.name}; it has: {', '.join(loaded)}", f"{field}.controlnet")
        _check(name not in images, f"ControlNet '{name}' is given two control images; give one entry per ControlNet", f"{field}.controlnet")
        _check(0 <= entry.scale <= MAX_CONTROL_SCALE, f"{field}.scale = {entry.scale}: use 0 to {MAX_CONTROL_SCALE:g} (1: as trained)", f"{field}.scale")
        _check(0 <= entry.start < entry.end <= 1, f"{field}.start = {entry.start:g} and end = {entry.end:g}: the fractions of the steps the "
               "ControlNet acts in, 0 <= start < end <= 1", f"{field}.start" if not 0 <= entry.start < 1 else f"{field}.end")
        image = decode_upload(entry.image, f"{field}.image", limits)
        if image.size != (size, size):
            notes.append(f"{field}.image is {image.width}x{image.height} pixels; its centre square was resized to {size}x{size}, the output size")
        images[name] = control_picture(image, entry.annotator, size, f"{field}.annotator")
        for key, value in zip(settings, (entry.scale, entry.start, entry.end, entry.annotator)):
            settings[key].append(value)
    return {"control_image": images, **settings}, notes


def annotate_png(req: AnnotateRequest, limits: Limits) -> bytes:
    """POST /api/annotate: the annotator's output for the image, as a PNG (at `size` when given, else the image's own size)."""
    image = decode_upload(req.image, "image", limits)
    _check(req.size is None or 8 <= req.size <= 4096, f"size = {req.size}: use 8 to 4096 pixels, or leave it out (the image's size)", "size")
    size = req.size or min(image.size)
    return png_bytes(control_picture(image, req.annotator, size, "annotator"))
