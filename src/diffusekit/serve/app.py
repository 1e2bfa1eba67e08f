"""The HTTP face: the page, the native JSON API (submit, progress, result, cancel) and OpenAI's
POST /v1/images/generations. It parses and checks requests (requests.py) and hands jobs to the model
workers (jobs.py); it holds no diffusion logic.

    GET  /                          the page (static/: plain HTML, CSS and JS shipped in the package)
    GET  /api/models                the models, their sizes, samplers and the limits
    POST /api/jobs                  submit a job -> 202 {id, status, position, ...}; 429 + Retry-After when the queue is full
    GET  /api/jobs/{id}             its state and, when done, its images
    GET  /api/jobs/{id}/events      server-sent events: running, progress (with an x0 preview), done / failed / cancelled
    DELETE /api/jobs/{id}           cancel it
    GET  /api/jobs/{id}/animation.gif, /api/images, /api/images/{id}.png
    POST /v1/images/generations     OpenAI's Images API (b64_json or url); GET /v1/models
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hmac
import json
import logging
import re
import threading
import time
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from diffusekit.models import size_multiple
from diffusekit.samplers import SAMPLERS
from diffusekit.schedule import SPACINGS
from diffusekit.serve.jobs import FINISHED, Gallery, Job, ModelWorker, QueueFull
from diffusekit.serve.requests import JobRequest, Limits, OpenAIImageRequest, RequestError, check_job, mib, parse_body
from diffusekit.version import __version__

STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
ID = re.compile(r"[0-9a-f]{16}")
HOST = re.compile(r"\[(?P<ipv6>[0-9a-f:.]*)\](?::\d{1,5})?|(?P<name>[^:\[\]]*)(?::\d{1,5})?|(?P<bare_ipv6>[0-9a-f:.]+)")
LOG = logging.getLogger("uvicorn.error")  # uvicorn's own log: its format and --log-level
KEEPALIVE_S = 1.0  # an idle event stream sends a comment this often, which is how a closed client is noticed
MAX_JOBS_KEPT = 256  # finished jobs remembered (with their animations); the gallery keeps the images


class Server:
    """The state behind the app: a worker per model, the jobs, the gallery, the limits and the API key."""

    def __init__(self, pipes: dict, limits: Limits, queue_size: int = 8, gallery: Gallery | None = None, api_key: str | None = None):
        if not pipes:
            raise ValueError("a server needs at least one model")
        self.limits, self.api_key = limits, api_key
        self.gallery = gallery or Gallery()
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
        job = Job(worker.name, call, seed, req.index, req.animate)
        try:
            position = worker.submit(job)
        except QueueFull as full:
            raise RequestError(str(full), status=429, code="queue_full", headers={"Retry-After": str(full.retry_after)}) from None
        with self.lock:
            self.jobs[job.id] = job
            for old_id in [i for i, j in self.jobs.items() if j.status in FINISHED][: max(0, len(self.jobs) - MAX_JOBS_KEPT)]:
                del self.jobs[old_id]
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

    def models(self) -> list[dict]:
        out = []
        for name, worker in self.workers.items():
            config, multiple = worker.pipe.config, size_multiple(worker.pipe.config)
            largest = self.limits.size_limit(config)
            out.append({"name": name, "fingerprint": worker.pipe.fingerprint, "size": config.data.image_size, "text": worker.pipe.text_encoder is not None,
                        "latent": worker.pipe.vae is not None, "sizes": list(range(multiple, largest + 1, multiple)), "samplers": list(SAMPLERS),
                        "schedules": list(SPACINGS), "defaults": {"sampler": config.sample.sampler, "schedule": config.sample.spacing,
                                                                  "steps": min(config.sample.steps, self.limits.max_steps),
                                                                  "guidance": config.sample.guidance}})
        return out


def error_response(err: RequestError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def read_json(request: Request, kind, limits: Limits):
    """The request's JSON body as `kind`: application/json only (a page elsewhere cannot post it without CORS), size-capped."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise RequestError("send the body as JSON with the header Content-Type: application/json", status=415, code="unsupported_media_type")
    cap, body = limits.body_bytes(), bytearray()
    declared = request.headers.get("content-length", "")
    too_large = RequestError(f"the request body is larger than the {mib(cap)} allowed; send smaller images", status=413, code="too_large")
    if declared.isascii() and declared.isdecimal() and (len(declared) > 18 or int(declared) > cap):
        raise too_large
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > cap:
                raise too_large
    except ClientDisconnect:
        where = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        LOG.warning(f"{where} went away after {len(body)} of {declared or '?'} bytes of its {request.method} {request.url.path[:80]} body")
        raise RequestError("the client disconnected before sending the whole body", status=499, code="client_disconnected") from None
    return await run_in_threadpool(parse_body, bytes(body), kind)


def host_name(header: str) -> str | None:
    """The name in a Host header, lower-case, without brackets or port ("[::1]:7860" -> "::1"); None if malformed."""
    match = HOST.fullmatch(header.strip().lower())
    return match[match.lastgroup] if match else None


class Guard:
    """Pure ASGI middleware (it leaves streaming and disconnects alone): the Host check against DNS rebinding,
    and the API key on /api/ and /v1/ (the page itself needs none: it asks for the key)."""

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
        elif self.server.api_key and (scope["path"].startswith("/api/") or scope["path"].startswith("/v1/")):
            given = headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not hmac.compare_digest(token.encode(), self.server.api_key.encode()):
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
    app.get("/style.css", include_in_schema=False)(lambda: static("style.css"))

    @app.get("/api/health")
    def health():
        return {"status": "ok", "version": __version__, "models": list(server.workers)}

    @app.get("/api/models")
    def models():
        return {"models": server.models(), "limits": vars(server.limits)}

    @app.post("/api/jobs", status_code=202)
    async def submit(request: Request):
        req = await read_json(request, JobRequest, server.limits)
        job, position = await run_in_threadpool(server.submit, req)
        return JSONResponse(job.summary(position), status_code=202)

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
                first = {"event": job.status if job.status in FINISHED else "state", "job": server.summary(job), "preview": job.preview}
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
    def gallery():
        return {"images": [image.summary() for image in server.gallery.newest_first()]}

    @app.get("/api/images/{name}")
    def image_file(name: str):
        image_id = name.removesuffix(".png")
        image = server.gallery.get(image_id) if ID.fullmatch(image_id) else None
        if image is None:
            raise RequestError(f"no image '{name[:40]}' in the gallery (it keeps the newest {server.gallery.capacity})", "id", 404, "not_found")
        return Response(image.png, media_type="image/png", headers={"Content-Disposition": f'inline; filename="diffusekit-{image.id}.png"'})

    @app.get("/v1/models")
    def openai_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "diffusekit"} for name in server.workers]}

    @app.post("/v1/images/generations")
    async def openai_generations(request: Request):
        req = await read_json(request, OpenAIImageRequest, server.limits)
        job, _ = await run_in_threadpool(server.submit, JobRequest(**req.job_fields()))
        queue = job.watch(asyncio.get_running_loop())
        try:
            while not job.done.is_set():
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody to answer: unwatch (below) cancels the job
                try:
                    await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    pass
        finally:
            job.unwatch(queue)
        if job.status != "done":
            status = 400 if job.error and job.error.get("type") == "invalid_request_error" else 500
            message = (job.error or {}).get("message", f"the job was {job.status}")
            raise RequestError(message, status=status, code=(job.error or {}).get("code", job.status))
        base = str(request.base_url).rstrip("/")
        data = [{"b64_json": base64.b64encode(image.png).decode()} if req.response_format == "b64_json" else {"url": base + image.summary()["url"]}
                for image in job.images]
        for item, image in zip(data, job.images):
            item["revised_prompt"] = req.prompt
            item["seed"], item["index"] = image.seed, image.index
        return {"created": int(time.time()), "data": data, "output_format": "png", "size": f"{job.call['size']}x{job.call['size']}"}

    return app
