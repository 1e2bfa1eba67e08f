"""What the routes of every API share about HTTP: a JSON body read within the limits, and a client that waits for
its job to finish (its going away cancels the job, when nobody else watches it); a job that did not finish well
becomes the RequestError its client is answered with."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from diffusekit.serve.jobs import Job
from diffusekit.serve.requests import Limits, RequestError, mib, parse_body

LOG = logging.getLogger("uvicorn.error")  # uvicorn's own log: its format and --log-level
GUARDED = ("/api/", "/v1/", "/sdapi/")  # the paths an API key guards
KEEPALIVE_S = 1.0  # an idle event stream sends a comment this often, which is how a closed client is noticed


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


async def wait_for_job(request: Request, job: Job) -> bool:
    """Wait until `job` is finished while its client stays; False when the client went away first (then, unless
    someone else watches the job, it is cancelled)."""
    queue = job.watch(asyncio.get_running_loop())
    try:
        while not job.done.is_set():
            if await request.is_disconnected():
                return False
            try:
                await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except asyncio.TimeoutError:
                pass
    finally:
        job.unwatch(queue)
    return True


def job_failure(job: Job) -> RequestError | None:
    """None for a job that is done; else the error its waiting client gets (a 400 for what the request asked wrongly)."""
    if job.status == "done":
        return None
    status = 400 if job.error and job.error.get("type") == "invalid_request_error" else 500
    message = (job.error or {}).get("message", f"the job was {job.status}")
    return RequestError(message, status=status, code=(job.error or {}).get("code", job.status))


def presented_key(headers: dict) -> str:
    """The API key a request carries: Authorization: Bearer KEY, X-API-Key: KEY, or HTTP Basic auth with the key as
    the password (any user name: how AUTOMATIC1111's clients send --api-auth); "" when none."""
    given = headers.get("authorization", "")
    if given.lower().startswith("bearer "):
        return given[7:]
    if given.lower().startswith("basic "):
        try:
            return base64.b64decode(given[6:].strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, ValueError):
            return ""
    return headers.get("x-api-key", "")
