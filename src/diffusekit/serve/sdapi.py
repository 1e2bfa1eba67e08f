"""AUTOMATIC1111's web API (/sdapi/v1), which Krita and GIMP plugins, Open WebUI, SillyTavern and the `webuiapi`
client speak, over the same server as the native and OpenAI routes: the same queue and workers, limits, Host
check and API key. It translates (sdapi_requests.py, a1111_names.py) and calls Server.submit; nothing else.

    POST /sdapi/v1/txt2img, /img2img   -> {images: [base64 PNG], parameters, info: a JSON string, A1111's}
    GET  /sdapi/v1/progress            the running job: progress, eta_relative, state, current_image (its x0 preview)
    POST /sdapi/v1/interrupt, /skip    cancel the running job(s)
    GET  /sdapi/v1/options             sd_model_checkpoint, ...; POST it to switch the model /sdapi requests use
    GET  /sdapi/v1/sd-models, /samplers, /schedulers; /upscalers, /sd-vae, /loras, /prompt-styles (empty); /scripts
    POST /sdapi/v1/png-info            {image} -> {info: its parameters text, items, parameters}
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from diffusekit.images import PARAMETERS_KEY, parse_parameters
from diffusekit.serve.a1111_names import a1111_name, samplers_list, schedulers_list
from diffusekit.serve.jobs import Job
from diffusekit.serve.requests import RequestError, decode_upload
from diffusekit.serve.sdapi_requests import (
    A1111Request,
    Img2ImgRequest,
    Txt2ImgRequest,
    Understood,
    a1111_error,
    check_nested_text,
    job_request,
    requested_checkpoint,
)
from diffusekit.serve.transport import job_failure, read_json, wait_for_job
from diffusekit.version import __version__

PREFIX = "/sdapi/v1"
EMPTY_LISTS = ("upscalers", "sd-vae", "loras", "prompt-styles", "hypernetworks", "face-restorers", "realesrgan-models")


class OptionsRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    sd_model_checkpoint: str | None = None


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str


class Checkpoints:
    """The served models as A1111 checkpoints ("NAME [HASH]"), and the one /sdapi requests use unless they name another."""

    def __init__(self, server):
        self.server = server
        self.current = next(iter(server.workers))

    def title(self, name: str) -> str:
        return f"{name} [{self.server.workers[name].pipe.fingerprint}]"

    def find(self, text: str, field: str) -> str:
        """The served model a title, name or hash names; a 400 listing the served ones otherwise."""
        for name, worker in self.server.workers.items():
            if text.strip() in (name, self.title(name), worker.pipe.fingerprint):
                return name
        served = ", ".join(f"'{self.title(name)}'" for name in self.server.workers)
        raise RequestError(f"{field}: the model '{text[:80]}' is not served here; this server has: {served} "
                           f"(GET {PREFIX}/sd-models; start `diffusekit serve` with --model for others)", field, code="model_not_found")

    def listing(self) -> list[dict]:
        return [{"title": self.title(name), "model_name": name, "hash": worker.pipe.fingerprint, "sha256": None, "filename": name, "config": None}
                for name, worker in self.server.workers.items()]


def encoded(data_url: str | None) -> str | None:
    """A PNG data URL's base64 part (A1111 sends previews without the prefix)."""
    return data_url.split(",", 1)[1] if data_url else None


def same_origin(request: Request) -> bool:
    """False for a request a web page of another site sent (a body-less POST needs no CORS preflight, so the
    JSON-only rule does not cover it): its Origin differs from the Host it was sent to, or the browser says cross-site."""
    origin, host = request.headers.get("origin"), request.headers.get("host", "")
    if request.headers.get("sec-fetch-site") == "cross-site":
        return False
    return origin is None or origin.split("://", 1)[-1].rstrip("/").lower() == host.lower()


def info_of(req: A1111Request, job: Job, understood: Understood, pipe) -> dict:
    """The answer's `info` as A1111 writes it (Processed.js()), plus what was ignored and noted."""
    texts = [image.parameters for image in job.images]
    first = parse_parameters(texts[0]) if texts else {}
    n, size = len(texts), job.call["size"]
    choice = understood.choice
    return {"prompt": req.prompt, "all_prompts": [req.prompt] * n, "negative_prompt": req.negative_prompt,
            "all_negative_prompts": [req.negative_prompt] * n, "seed": job.seed, "all_seeds": [job.seed] * n,
            "all_image_indexes": [image.index for image in job.images], "subseed": req.subseed, "all_subseeds": [req.subseed] * n,
            "subseed_strength": req.subseed_strength, "width": size, "height": size,
            "sampler_name": choice.sampler.name if choice.sampler else a1111_name(first.get("Sampler", pipe.config.sample.sampler)),
            "scheduler": choice.scheduler.label, "cfg_scale": first.get("CFG scale"), "steps": first.get("Steps"), "batch_size": req.batch_size,
            "n_iter": req.n_iter, "restore_faces": False, "face_restoration_model": None, "sd_model_name": understood.model,
            "sd_model_hash": pipe.fingerprint, "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": first.get("Denoising strength"), "extra_generation_params": {"Schedule type": first.get("Schedule type"),
                                                                                            "diffusekit sampler": first.get("Sampler")},
            "index_of_first_image": 0, "infotexts": texts, "styles": req.styles or [], "clip_skip": 1, "is_using_inpainting_conditioning": False,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)), "version": f"diffusekit {__version__}",
            "ignored": understood.ignored, "notes": understood.notes}


def parameters_of(req: A1111Request, info: dict, title: str) -> dict:
    """The answer's `parameters`: the request's A1111 fields as understood (what ran where it differs from what was sent)."""
    fields = {name: getattr(req, name) for name in type(req).model_fields}
    fields.update({key: info[key] for key in ("seed", "sampler_name", "scheduler", "steps", "cfg_scale", "width", "height")})
    fields["override_settings"] = {**(req.override_settings or {}), "sd_model_checkpoint": title}
    if isinstance(req, Img2ImgRequest):
        fields["denoising_strength"] = info["denoising_strength"]
        if not req.include_init_images:  # as A1111: the uploads are not sent back unless asked for
            fields["init_images"], fields["mask"] = None, None
    return fields


def add_sdapi_routes(app: FastAPI, server) -> None:
    """AUTOMATIC1111's /sdapi/v1 routes on `app`, over `server` (serve.app.Server)."""
    checkpoints = Checkpoints(server)

    async def generate(request: Request, kind: type[A1111Request]):
        req = await read_json(request, kind, server.limits)
        check_nested_text(req)  # before any of it is echoed in a message
        asked = requested_checkpoint(req)
        model = checkpoints.find(asked, "override_settings.sd_model_checkpoint") if asked else checkpoints.current
        try:
            native, understood = await run_in_threadpool(job_request, req, server.workers[model].pipe, model, server.limits)
            job, _ = await run_in_threadpool(server.submit, native)
        except RequestError as err:
            raise a1111_error(err) from None
        if asked and not req.override_settings_restore_afterwards:  # as A1111: the override stays the setting
            checkpoints.current = model
        if not await wait_for_job(request, job):
            return Response(status_code=499)  # nobody to answer; the job was cancelled
        if job.status == "cancelled":
            raise RequestError(f"the job was interrupted (POST {PREFIX}/interrupt) before it finished; no image was made", status=409,
                               code="interrupted")
        if failure := job_failure(job):
            raise failure
        pipe = server.workers[model].pipe
        info = info_of(req, job, understood, pipe)
        pngs = [image.png if image.png is not None else server.gallery.png(image) for image in job.images] if req.send_images else []
        return {"images": [base64.b64encode(png).decode() for png in pngs if png is not None],
                "parameters": parameters_of(req, info, checkpoints.title(model)), "info": json.dumps(info)}

    @app.post(f"{PREFIX}/txt2img")
    async def txt2img(request: Request):
        return await generate(request, Txt2ImgRequest)

    @app.post(f"{PREFIX}/img2img")
    async def img2img(request: Request):
        return await generate(request, Img2ImgRequest)

    def now_running() -> tuple[list[Job], int]:
        """The running jobs (one per busy model) and how many wait."""
        running, waiting = [], 0
        for worker in server.workers.values():
            with worker.condition:
                running += [worker.running] if worker.running is not None and not worker.running.done.is_set() else []
                waiting += len(worker.waiting)
        return running, waiting

    @app.get(f"{PREFIX}/progress")
    def progress(skip_current_image: str = "false"):
        running, waiting = now_running()
        state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": len(running) + waiting,
                 "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        if not running:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        job = min(running, key=lambda j: j.started or time.time())  # the one running longest
        done = job.step / job.steps if job.steps else 0.0
        elapsed = time.time() - (job.started or time.time())
        state.update(job=f"{job.model} {job.id}", interrupted=job.cancel_requested.is_set(), sampling_step=job.step, sampling_steps=job.steps,
                     job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)))
        return {"progress": done, "eta_relative": elapsed / done - elapsed if done > 0 else 0.0, "state": state,
                "current_image": None if skip_current_image.lower() in ("true", "1") else encoded(job.preview),
                "textinfo": f"{job.model}: step {job.step} of {job.steps}"}

    def cancel_running(request: Request) -> dict:
        if not same_origin(request):
            raise RequestError("a web page of another site may not interrupt this server's jobs", status=403, code="cross_origin")
        running, _ = now_running()
        for job in running:
            server.workers[job.model].cancel(job)
        return {"interrupted": [job.id for job in running]}

    app.post(f"{PREFIX}/interrupt")(cancel_running)
    app.post(f"{PREFIX}/skip")(cancel_running)  # a request is one job: there is no next image of it to go on with

    @app.get(f"{PREFIX}/options")
    def options():
        name = checkpoints.current
        return {"sd_model_checkpoint": checkpoints.title(name), "sd_checkpoint_hash": server.workers[name].pipe.fingerprint,
                "samples_format": "png", "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1}

    @app.post(f"{PREFIX}/options")
    async def set_options(request: Request):
        req = await read_json(request, OptionsRequest, server.limits)
        if req.sd_model_checkpoint is not None:
            checkpoints.current = checkpoints.find(req.sd_model_checkpoint, "sd_model_checkpoint")
        return {"sd_model_checkpoint": checkpoints.title(checkpoints.current), "ignored": sorted(req.model_extra or {})}

    app.get(f"{PREFIX}/sd-models")(checkpoints.listing)
    app.get(f"{PREFIX}/samplers")(samplers_list)
    app.get(f"{PREFIX}/schedulers")(schedulers_list)
    app.get(f"{PREFIX}/scripts")(lambda: {"txt2img": [], "img2img": []})
    for name in EMPTY_LISTS:  # what this server has none of
        app.get(f"{PREFIX}/{name}")(lambda: [])

    @app.post(f"{PREFIX}/png-info")
    async def png_info(request: Request):
        req = await read_json(request, PngInfoRequest, server.limits)
        image = await run_in_threadpool(decode_upload, req.image, "image", server.limits)
        text = image.info.get(PARAMETERS_KEY)
        items: dict[str, Any] = {key: value for key, value in image.info.items() if key != PARAMETERS_KEY and isinstance(value, str)}
        return {"info": text if isinstance(text, str) else "", "items": items, "parameters": parse_parameters(text) if isinstance(text, str) else {}}
