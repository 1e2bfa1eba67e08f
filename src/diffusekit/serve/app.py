"""The HTTP face: the page, the native JSON API (submit, progress, result, cancel) and OpenAI's
POST /v1/images/generations. It parses and checks requests (requests.py) and hands jobs to the model
workers (jobs.py); it holds no diffusion logic.

    GET  /                          the page (static/: plain HTML, CSS and JS shipped in the package)
    GET  /api/models                the models, their sizes, samplers and the limits
    POST /api/jobs                  submit a job -> 202 {id, status, position, ...}; 429 + Retry-After when the queue is full
    GET  /api/jobs/{id}             its state and, when done, its images (and notes: a control image resized)
    POST /api/annotate              an image's Canny edges or scribble as a PNG, as a job's "control" would use it (control_requests.py)
    GET  /api/models/{name}/schedule?steps=&schedule=&size=   the noise schedule and a sampling's sigmas (inside.py)
    GET  /api/jobs/{id}/events      server-sent events: running, progress (previews of x0_hat and x_t), done / failed / cancelled
    DELETE /api/jobs/{id}           cancel it
    GET  /api/jobs/{id}/animation.gif, /api/images?offset=&limit= (newest first), /api/images/{id}.png
    DELETE /api/images/{id}         move it to the outputs folder's trash/ (gallery.py, outputs.py)
    GET  /api/status                where images are saved, and why not when they cannot be
    POST /v1/images/generations     OpenAI's Images API (b64_json or url); GET /v1/models
    /sdapi/v1/...                   AUTOMATIC1111's API: txt2img, img2img, progress, options, ... (sdapi.py)
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hmac
import json
import re
import threading
import time
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffusekit.models import size_multiple
from diffusekit.samplers import SAMPLERS
from diffusekit.schedule import SPACINGS
from diffusekit.serve.control_requests import annotate_png, check_controls
from diffusekit.serve.gallery import Gallery, GalleryImage
from diffusekit.serve.inside import schedule_answer
from diffusekit.serve.jobs import FINISHED, Job, ModelWorker, QueueFull
from diffusekit.serve.requests import AnnotateRequest, JobRequest, Limits, OpenAIImageRequest, RequestError, check_job
from diffusekit.serve.sdapi import add_sdapi_routes
from diffusekit.serve.transport import GUARDED, KEEPALIVE_S, job_failure, presented_key, read_json, wait_for_job
from diffusekit.version import __version__

STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8", "inside.js": "text/javascript; charset=utf-8",
          "control.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
ID = re.compile(r"[0-9a-f]{16}")
HOST = re.compile(r"\[(?P<ipv6>[0-9a-f:.]*)\](?::\d{1,5})?|(?P<name>[^:\[\]]*)(?::\d{1,5})?|(?P<bare_ipv6>[0-9a-f:.]+)")
MAX_JOBS_KEPT = 256  # finished jobs remembered (with their animations); the gallery keeps the images
MAX_ATTENTION_KEPT = 32  # of those, the newest jobs that keep their attention maps (up to n x tokens small PNGs each)
PAGE, MAX_PAGE = 100, 500  # gallery images per /api/images answer: by default, at most


class Server:
    """The state behind the app: a worker per model, the jobs, the gallery, the limits and the API key."""

    def __init__(self, pipes: dict, limits: Limits, queue_size: int = 8, gallery: Gallery | None = None, api_key: str | None = None):
        """gallery: where images go (default: the newest 256 in memory; Gallery(folder=...) saves them and shows what is there)."""
        if not pipes:
            raise ValueError("a server needs at least one model")
        self.limits, self.api_key = limits, api_key
        self.gallery = gallery if gallery is not None else Gallery()
        self.workers = {name: ModelWorker(name, pipe, self.gallery, queue_size) for name, pipe in pipes.items()}
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self.lock = threading.Lock()

    def worker(self, name: str | None) -> ModelWorker:
        if name is None:
            return next(iter(self.workers.values()))
        if name not in self.workers:
            raise RequestError(f"unknown model '{name}'; this server has: {', '.join(self.workers)}", "model", code="model_not_found")
        return self.workers[name]

    def submit(self, req: JobRequest) -> tuple[Job, int]:
        worker = self.worker(req.model)
        call, seed = check_job(req, worker.pipe, self.limits, worker.name)
        control, notes = check_controls(req.control, worker.pipe, self.limits, call["size"])
        job = Job(worker.name, {**call, **control}, seed, req.index, req.animate)
        job.notes = notes
        try:
            position = worker.submit(job)
        except QueueFull as full:
            raise RequestError(str(full), status=429, code="queue_full", headers={"Retry-After": str(full.retry_after)}) from None
        with self.lock:
            self.jobs[job.id] = job
            for old_id in [i for i, j in self.jobs.items() if j.status in FINISHED][: max(0, len(self.jobs) - MAX_JOBS_KEPT)]:
                del self.jobs[old_id]
            for old in [j for j in self.jobs.values() if j.attention is not None or j.call.get("return_attention")][:-MAX_ATTENTION_KEPT]:
                old.attention = None
        return job, position

    def close(self) -> None:
        """Cancel every job and stop the workers (a running job stops at its next step)."""
        for worker in self.workers.values():
            worker.stop()
        for worker in self.workers.values():
            worker.thread.join(timeout=30)

    def job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id) if ID.fullmatch(job_id) else None
        if job is None:
            raise RequestError(f"no job '{job_id[:40]}' on this server (jobs are kept while the server runs)", "id", 404, "not_found")
        return job

    def summary(self, job: Job) -> dict:
        return job.summary(self.workers[job.model].position(job))

    def image(self, name: str) -> GalleryImage:
        """The gallery's image called `name` (its id, ".png" allowed); a 404 for any other name (never a path)."""
        image_id = name.removesuffix(".png")
        image = self.gallery.get(image_id) if ID.fullmatch(image_id) else None
        if image is None:
            raise RequestError(f"no image '{name[:40]}' in the gallery (deleted, or not made here)", "id", 404, "not_found")
        return image

    def models(self) -> list[dict]:
        out = []
        for name, worker in self.workers.items():
            config, multiple = worker.pipe.config, size_multiple(worker.pipe.config)
            largest = self.limits.size_limit(config)
            out.append({"name": name, "fingerprint": worker.pipe.fingerprint, "size": config.data.image_size, "text": worker.pipe.text_encoder is not None,
                        "controlnets": list(worker.pipe.controlnets),
                        "latent": worker.pipe.vae is not None, "sizes": list(range(multiple, largest + 1, multiple)), "samplers": list(SAMPLERS),
                        "schedules": list(SPACINGS), "defaults": {"sampler": config.sample.sampler, "schedule": config.sample.spacing,
                                                                  "steps": min(config.sample.steps, self.limits.max_steps),
                                                                  "guidance": config.sample.guidance}})
        return out


def page_number(text: str, name: str, low: int, high: int) -> int:
    """A paging query parameter (offset, limit) as a whole number in [low, high], or a 400 naming it."""
    if not (text.isascii() and text.isdecimal() and len(text) <= 10 and low <= int(text) <= high):
        raise RequestError(f"{name} must be a whole number from {low} to {high}, not '{text[:20]}'", name)
    return int(text)


def error_response(err: RequestError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def host_name(header: str) -> str | None:
    """The name in a Host header, lower-case, without brackets or port ("[::1]:7860" -> "::1"); None if malformed."""
    match = HOST.fullmatch(header.strip().lower())
    return match[match.lastgroup] if match else None


class Guard:
    """Pure ASGI middleware (it leaves streaming and disconnects alone): the Host check against DNS rebinding,
    and the API key on /api/, /v1/ and /sdapi/ (the page itself needs none: it asks for the key)."""

    def __init__(self, app, server: Server, allowed_hosts: list[str] | None):
        self.app, self.server, self.allowed_hosts = app, server, allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = None
        if self.allowed_hosts is not None and host_name(headers.get("host", "")) not in self.allowed_hosts:
            refusal = RequestError(f"Host '{headers.get('host', '')[:60]}' is not this server's name; open http://127.0.0.1:PORT/",
                                   status=421, code="bad_host")
        elif self.server.api_key and scope["path"].startswith(GUARDED):
            if not hmac.compare_digest(presented_key(headers).encode(), self.server.api_key.encode()):
                refusal = RequestError("this server needs an API key: send the header Authorization: Bearer KEY", status=401, code="invalid_api_key")
        if refusal is not None:
            return await error_response(refusal)(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(server: Server, allowed_hosts: list[str] | None = None) -> FastAPI:
    """The FastAPI app over `server`. allowed_hosts: the Host headers accepted (None: any); a server on
    localhost names its loopback names, so that a web page elsewhere cannot reach it by DNS rebinding."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(server.close)

    app = FastAPI(title="diffusekit", version=__version__, docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(RequestError)
    async def _request_error(request, err: RequestError):
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err: StarletteHTTPException):
        return error_response(RequestError(f"{err.detail}: {request.method} {request.url.path[:80]}", status=err.status_code, code="not_found"))

    app.add_middleware(Guard, server=server, allowed_hosts=allowed_hosts)

    def static(name: str) -> Response:
        body = (resources.files("diffusekit.serve") / "static" / name).read_bytes()
        return Response(body, media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    app.get("/", include_in_schema=False)(lambda: static("index.html"))
    app.get("/app.js", include_in_schema=False)(lambda: static("app.js"))
    app.get("/inside.js", include_in_schema=False)(lambda: static("inside.js"))
    app.get("/control.js", include_in_schema=False)(lambda: static("control.js"))
    app.get("/style.css", include_in_schema=False)(lambda: static("style.css"))

    @app.get("/api/health")
    def health():
        return {"status": "ok", "version": __version__, "models": list(server.workers)}

    @app.get("/api/models")
    def models():
        return {"models": server.models(), "limits": vars(server.limits)}

    @app.get("/api/models/{name}/schedule")
    def noise_schedule(name: str, steps: str | None = None, schedule: str | None = None, size: str | None = None):
        pipe = server.worker(name).pipe
        steps_asked = page_number(steps, "steps", 1, server.limits.max_steps) if steps is not None else None
        size_asked = page_number(size, "size", 1, 2**20) if size is not None else None
        return schedule_answer(pipe, server.limits, steps_asked, schedule, size_asked)

    @app.post("/api/jobs", status_code=202)
    async def submit(request: Request):
        req = await read_json(request, JobRequest, server.limits)
        job, position = await run_in_threadpool(server.submit, req)
        return JSONResponse(job.summary(position), status_code=202)

    @app.post("/api/annotate")
    async def annotate(request: Request):
        req = await read_json(request, AnnotateRequest, server.limits)
        return Response(await run_in_threadpool(annotate_png, req, server.limits), media_type="image/png")

    @app.get("/api/jobs/{job_id}")
    def job_state(job_id: str):
        return server.summary(server.job(job_id))

    @app.delete("/api/jobs/{job_id}")
    def cancel(job_id: str):
        job = server.job(job_id)
        server.workers[job.model].cancel(job)
        return server.summary(job)

    @app.get("/api/jobs/{job_id}/events")
    async def events(job_id: str):
        job = server.job(job_id)
        queue = job.watch(asyncio.get_running_loop())

        async def stream():
            try:
                first = {"event": job.status if job.status in FINISHED else "state", "job": server.summary(job), "preview": job.preview,
                         "noisy": job.noisy}
                yield f"event: {first['event']}\ndata: {json.dumps(first)}\n\n"
                while first["event"] not in FINISHED:
                    try:
                        event = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    yield f"event: {event['event']}\ndata: {json.dumps(event)}\n\n"
                    if event["event"] in FINISHED:
                        break
            finally:
                job.unwatch(queue)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/api/jobs/{job_id}/animation.gif")
    def animation(job_id: str):
        job = server.job(job_id)
        if job.animation is None:
            raise RequestError("this job has no animation: submit it with \"animate\": true and wait until it is done", "animate", 404, "not_found")
        return Response(job.animation, media_type="image/gif")

    @app.get("/api/images")
    def gallery(offset: str = "0", limit: str = str(PAGE)):
        first, count = page_number(offset, "offset", 0, 10**9), page_number(limit, "limit", 1, MAX_PAGE)
        images, total = server.gallery.page(first, count)
        return {"images": [image.summary() for image in images], "offset": first, "limit": count, "total": total}

    @app.get("/api/status")
    def status():
        return server.gallery.status()

    @app.get("/api/images/{name}")
    def image_file(name: str):
        image = server.image(name)
        png = server.gallery.png(image)
        if png is None:
            raise RequestError(f"the file of image '{image.id}' is gone from the outputs folder", "id", 404, "not_found")
        return Response(png, media_type="image/png", headers={"Content-Disposition": f'inline; filename="diffusekit-{image.id}.png"'})

    @app.delete("/api/images/{name}")
    def delete_image(name: str):
        image = server.image(name)
        try:
            trashed = server.gallery.delete(image.id)
        except KeyError:
            raise RequestError(f"no image '{image.id}' in the gallery (deleted, or not made here)", "id", 404, "not_found") from None
        except OSError as err:
            raise RequestError(f"could not move image '{image.id}' into the trash of the outputs folder ({err.strerror or err}); "
                               "make the folder writable and try again", "id", 500, "outputs_unwritable") from None
        folder = server.gallery.outputs.root if trashed is not None else None
        return {"id": image.id, "deleted": True, "trash": trashed.relative_to(folder).as_posix() if folder else None}

    @app.get("/v1/models")
    def openai_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "diffusekit"} for name in server.workers]}

    @app.post("/v1/images/generations")
    async def openai_generations(request: Request):
        req = await read_json(request, OpenAIImageRequest, server.limits)
        job, _ = await run_in_threadpool(server.submit, JobRequest(**req.job_fields()))
        if not await wait_for_job(request, job):
            return Response(status_code=499)  # nobody to answer; the job was cancelled
        if failure := job_failure(job):
            raise failure
        base = str(request.base_url).rstrip("/")
        data = [{"b64_json": base64.b64encode(image.png).decode()} if req.response_format == "b64_json" else {"url": base + image.summary()["url"]}
                for image in job.images]
        for item, image in zip(data, job.images):
            item["revised_prompt"] = req.prompt
            item["seed"], item["index"] = image.seed, image.index
        return {"created": int(time.time()), "data": data, "output_format": "png", "size": f"{job.call['size']}x{job.call['size']}"}

    add_sdapi_routes(app, server)  # AUTOMATIC1111's /sdapi/v1 (sdapi.py)
    return app
