"""Property-based tests of the native API's bodies: any JSON value in any field of POST /api/jobs, and any bytes
as the body, is answered 2xx or 4xx with a JSON body, never 5xx. No image is made: the models' networks wait
at a gate that opens only when the test is over, so accepted jobs just queue."""

from __future__ import annotations

import base64
import io
import json
import math

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from serve_helpers import gated, tiny_pipe

from diffusekit.serve import Limits, Server, create_app
from diffusekit.serve.requests import JobRequest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def client():
    pipes = {"tiny": tiny_pipe(), "chars": tiny_pipe(text=True)}
    gates = [gated(pipe) for pipe in pipes.values()]
    server = Server(pipes, Limits(max_upload_pixels=4096), queue_size=1000)
    with TestClient(create_app(server), raise_server_exceptions=False) as c:
        yield c
        for gate in gates:
            gate.open.set()  # the running jobs go on, and closing the server cancels them at their next step


def png_url(width: int, height: int, mode: str = "L") -> str:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["", "ab", "\ud800", "x\udfff", "\x00", "🍎", "data:", "data:image/png;base64"]))
NUMBERS = st.one_of(st.integers(), st.integers(-(10**120), 10**120), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, -1, 2, 8, 100, 2**31, 2**64, 1e308, -0.0, 0.5, 1e-300]))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)), max_leaves=6)
IMAGES = st.sampled_from([png_url(8, 8), png_url(4, 4, "RGBA"), png_url(1, 64), png_url(64, 64), png_url(8, 8)[5:], "***", "data:,", "",
                          "data:image/png;base64"])
PLAUSIBLE = {  # values near the valid ones, so that many bodies get past the types into the checks
    "prompt": TEXT, "negative_prompt": TEXT, "model": st.one_of(st.sampled_from(["tiny", "chars"]), TEXT),
    "sampler": st.one_of(st.sampled_from(["ddim", "euler", "dpmpp_2m"]), TEXT), "schedule": st.one_of(st.sampled_from(["karras", "leading"]), TEXT),
    "steps": st.integers(-2, 102), "guidance": st.floats(-1, 40), "guidance_rescale": st.floats(-1, 2), "eta": st.floats(-1, 2),
    "seed": st.integers(-2, 2**65), "index": st.integers(-2, 2**32), "size": st.integers(-2, 40), "n": st.integers(-1, 9),
    "image": IMAGES, "mask": IMAGES, "strength": st.floats(-0.5, 1.5), "mask_blur": st.floats(-1, 70),
    "jump_length": st.integers(-1, 1001), "jump_n_sample": st.integers(-1, 5), "animate": st.booleans(),
}


@st.composite
def job_bodies(draw) -> dict:
    fields = draw(st.lists(st.sampled_from([*JobRequest.model_fields, "unknown"]), max_size=6, unique=True))
    return {name: draw(st.one_of(PLAUSIBLE.get(name, JSON_VALUES), JSON_VALUES)) for name in fields}


def assert_json_answer(client, answer) -> None:
    """2xx or 4xx with a JSON body; an accepted job holds only what a worker can run: UTF-8 text, finite numbers."""
    assert answer.status_code < 500, answer.text
    assert answer.headers["content-type"] == "application/json", answer.text
    body = answer.json()
    if answer.status_code >= 400:
        assert set(body) == {"error"} and body["error"]["message"], body
        return event(f"{answer.status_code} {body['error']['param']}")
    event(str(answer.status_code))
    for key, value in client.app.state.server.jobs[body["id"]].call.items():
        if isinstance(value, str):
            value.encode("utf-8")
        elif isinstance(value, float):
            assert math.isfinite(value), key


@FAST
@given(body=job_bodies())
def test_any_json_fields_are_answered_2xx_or_4xx_with_json(client, body):
    raw = json.dumps(body, allow_nan=True).encode()  # NaN and Infinity as Python writes them; lone surrogates as \ud800
    assert_json_answer(client, client.post("/api/jobs", content=raw, headers={"content-type": "application/json"}))


def mutations(raw: bytes):
    return st.one_of(st.just(raw), st.integers(0, len(raw)).map(lambda cut: raw[:cut]),
                     st.tuples(st.integers(0, len(raw)), st.binary(max_size=8)).map(lambda c: raw[:c[0]] + c[1] + raw[c[0]:]))


@FAST
@given(raw=st.one_of(st.binary(max_size=40), JSON_VALUES.map(lambda v: json.dumps(v, allow_nan=True).encode()),
                     job_bodies().flatmap(lambda body: mutations(json.dumps(body, allow_nan=True).encode())),
                     st.integers(1, 3000).map(lambda depth: b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"),
                     st.integers(90, 5000).map(lambda digits: b'{"seed": ' + b"9" * digits + b"}")))
def test_any_body_bytes_are_answered_2xx_or_4xx_with_json(client, raw):
    assert_json_answer(client, client.post("/api/jobs", content=raw, headers={"content-type": "application/json"}))


def test_the_server_still_serves_after_the_fuzzing(client):
    assert client.get("/api/health").json()["status"] == "ok"
    assert all(job.status in ("queued", "running") for job in client.app.state.server.jobs.values())  # the gates hold every job
