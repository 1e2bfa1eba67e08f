"""`diffusekit serve` through FastAPI's TestClient and a real uvicorn: every endpoint, every limit, the
queue, cancelling, disconnecting clients, the API key, and the official `openai` client."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from serve_helpers import gated, running_server, tiny_pipe, wait_for

from diffusekit.images import parse_parameters
from diffusekit.serve import Limits, Server, create_app

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402


def make_client(pipes=None, **server_options):
    allowed = server_options.pop("allowed_hosts", None)
    server = Server(pipes or {"tiny": tiny_pipe(), "chars": tiny_pipe(text=True)}, server_options.pop("limits", Limits()), **server_options)
    return TestClient(create_app(server, allowed_hosts=allowed))


@pytest.fixture
def client():
    with make_client() as c:
        yield c


def events(client, job_id, on_first=None) -> list[dict]:
    """The job's server-sent events until it finishes; `on_first()` runs once the first one (the job's state) arrived."""
    seen = []
    with client.stream("GET", f"/api/jobs/{job_id}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
                if len(seen) == 1 and on_first:
                    on_first()
    return seen


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_the_page_and_its_assets_come_from_the_package_and_fetch_nothing_elsewhere(client):
    page = client.get("/")
    assert page.status_code == 200 and "<title>diffusekit studio</title>" in page.text
    for name, kind in (("/app.js", "javascript"), ("/style.css", "css")):
        asset = client.get(name)
        assert asset.status_code == 200 and kind in asset.headers["content-type"]
        assert "http://" not in asset.text and "https://" not in asset.text
    assert "http://" not in page.text and "https://" not in page.text


def test_models_lists_sizes_samplers_defaults_and_limits(client):
    data = client.get("/api/models").json()
    tiny = data["models"][0]
    assert [m["name"] for m in data["models"]] == ["tiny", "chars"] and tiny["size"] == 8 and not tiny["text"] and data["models"][1]["text"]
    assert tiny["sizes"][:3] == [2, 4, 6] and tiny["sizes"][-1] == 32 and "dpmpp_2m" in tiny["samplers"] and "karras" in tiny["schedules"]
    assert data["limits"]["max_n"] == 8 and client.get("/api/health").json()["status"] == "ok"


def test_a_job_streams_progress_with_previews_and_its_images_land_in_the_gallery():
    chars = tiny_pipe(text=True)
    gate = gated(chars)  # the job waits at its first network call until we watch it: no step is over before we subscribe
    with make_client({"tiny": tiny_pipe(), "chars": chars}) as client:
        job = client.post("/api/jobs", json={"model": "chars", "prompt": "ab", "n": 2, "steps": 4, "seed": 7, "animate": True})
        assert job.status_code == 202
        seen = events(client, job.json()["id"], on_first=gate.open.set)
        assert seen[0]["job"]["step"] == 0
        steps = [e["step"] for e in seen if e["event"] == "progress"]
        assert steps == [1, 2, 3, 4] and seen[-1]["event"] == "done"
        preview = next(e["preview"] for e in seen if e["event"] == "progress" and e["preview"])
        assert Image.open(io.BytesIO(base64.b64decode(preview.split(",", 1)[1]))).size == (16, 8)  # the batch's x0_hat, side by side
        done = client.get(f"/api/jobs/{job.json()['id']}").json()
        assert done["status"] == "done" and [image["index"] for image in done["images"]] == [0, 1]
        png = client.get(done["images"][1]["url"])
        assert png.headers["content-type"] == "image/png"
        recorded = parse_parameters(Image.open(io.BytesIO(png.content)).info["parameters"])
        assert recorded["prompt"] == "ab" and recorded["Seed"] == 7 and recorded["Image index"] == 1 and recorded["Model"] == "chars"
        gallery = client.get("/api/images").json()["images"]
        assert [g["id"] for g in gallery] == [done["images"][1]["id"], done["images"][0]["id"]]  # newest first
        gif = Image.open(io.BytesIO(client.get(done["animation"]).content))
        assert gif.format == "GIF" and gif.n_frames >= 2  # (PIL merges identical frames)


def test_a_random_seed_is_reported_and_makes_the_same_image_again(client):
    first = client.post("/api/jobs", json={"steps": 3, "seed": None})
    events(client, first.json()["id"])
    made = client.get(f"/api/jobs/{first.json()['id']}").json()
    again = client.post("/api/jobs", json={"steps": 3, "seed": made["seed"]})
    events(client, again.json()["id"])
    remade = client.get(f"/api/jobs/{again.json()['id']}").json()
    pixels = [np.asarray(Image.open(io.BytesIO(client.get(j["images"][0]["url"]).content))) for j in (made, remade)]
    assert np.array_equal(*pixels)


def test_inpainting_over_the_api_keeps_the_unmasked_pixels(client):
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8))
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 5:] = 255
    job = client.post("/api/jobs", json={"steps": 4, "image": data_url(init), "mask": data_url(Image.fromarray(mask)), "seed": 1})
    assert job.status_code == 202, job.text
    assert events(client, job.json()["id"])[-1]["event"] == "done"
    image = client.get(client.get(f"/api/jobs/{job.json()['id']}").json()["images"][0]["url"])
    out = np.asarray(Image.open(io.BytesIO(image.content)))
    assert np.array_equal(out[:, :5], np.asarray(init)[:, :5]) and not np.array_equal(out[:, 5:], np.asarray(init)[:, 5:])
    assert "Denoising strength: 1.0" in Image.open(io.BytesIO(image.content)).info["parameters"]
    edit = client.post("/api/jobs", json={"steps": 10, "image": data_url(init), "strength": 0.3})
    assert edit.status_code == 202 and events(client, edit.json()["id"])[-1]["event"] == "done"


def bomb() -> str:
    buffer = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


SMALL = data_url(Image.new("L", (8, 8)))
BAD_REQUESTS = [  # (body, status, the field named, a fragment of the message)
    ({"steps": "many"}, 400, "steps", "valid integer"),
    ({"n": 2.5}, 400, "n", "valid integer"),
    ({"model": "chars", "prompt": 3}, 400, "prompt", "valid string"),
    ({"sampler": "magic"}, 400, "sampler", "use one of: ddpm"),
    ({"schedule": "random"}, 400, "schedule", "use one of: leading"),
    ({"size": 7}, 400, "size", "multiples of 2"),
    ({"size": 64}, 400, "size", "up to 32"),
    ({"n": 0}, 400, "n", "1 to 8"),
    ({"n": 9}, 400, "n", "1 to 8"),
    ({"steps": 0}, 400, "steps", "1 to 100"),
    ({"steps": 101}, 400, "steps", "1 to 100"),
    ({"model": "chars", "prompt": "x" * 1001}, 400, "prompt", "1000 allowed"),
    ({"prompt": "a cat"}, 400, "prompt", "not text-conditioned"),
    ({"model": "../../etc"}, 400, "model", "this server has: tiny, chars"),
    ({"path": "/etc/passwd"}, 400, "path", "unknown field"),
    ({"seed": -5}, 400, "seed", "random"),
    ({"sampler": "dpmpp_2m", "eta": 0.5}, 400, None, "has no option 'eta'"),
    ({"mask": SMALL}, 400, "image", "need an init image"),
    ({"image": SMALL, "mask": data_url(Image.new("L", (4, 4)))}, 400, "mask", "the mask is 4x4 pixels but the image is 8x8"),
    ({"image": base64.b64encode(b"%PDF-1.4 not an image").decode()}, 400, "image", "not a PNG, JPEG or WebP"),
    ({"image": "***"}, 400, "image", "not base64"),
    ({"image": bomb()}, 400, "image", "5000x5000 pixels, more than"),
    ({"image": SMALL, "strength": 2}, 400, "strength", "(0, 1]"),
    ({"image": SMALL, "strength": 0.01, "steps": 10}, 400, "strength", "leaves no step"),
    ({"image": SMALL, "jump_n_sample": 9}, 400, "jump_n_sample", "1 (no resampling) to 4"),
]


@pytest.mark.parametrize("body, status, field, fragment", BAD_REQUESTS)
def test_a_bad_request_is_one_json_error_naming_the_field_and_the_server_keeps_serving(client, body, status, field, fragment):
    answer = client.post("/api/jobs", json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == field and fragment in error["message"] and error["type"] == "invalid_request_error"
    assert client.post("/api/jobs", json={"steps": 2}).status_code == 202


def test_bodies_that_are_not_json_or_too_large_are_refused(client):
    assert client.post("/api/jobs", content=b"{}", headers={"content-type": "text/plain"}).status_code == 415  # no cross-site form posts
    assert client.post("/api/jobs", content=b"{nope", headers={"content-type": "application/json"}).json()["error"]["code"] == "invalid_json"
    assert client.post("/api/jobs", content=b"[1]", headers={"content-type": "application/json"}).status_code == 400
    with make_client(limits=Limits(max_upload_bytes=1000)) as small:
        big = base64.b64encode(b"\0" * 100_000).decode()  # over the body's cap: 3 uploads and 64 kB
        answer = small.post("/api/jobs", json={"image": big, "steps": 2})
        assert answer.status_code == 413 and "MiB allowed" in answer.json()["error"]["message"]
        answer = small.post("/api/jobs", json={"image": base64.b64encode(b"\0" * 1500).decode(), "steps": 2})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "image"


def test_unknown_jobs_and_images_are_404_and_names_never_reach_the_disk(client):
    for path in ("/api/jobs/0123456789abcdef", "/api/jobs/..%2F..%2Fetc%2Fpasswd", "/api/images/../../etc/passwd", "/api/images/x.png",
                 "/api/jobs/0123456789abcdef/animation.gif", "/static/../../pyproject.toml"):
        answer = client.get(path)
        assert answer.status_code == 404 and "error" in answer.json(), path


def test_a_full_queue_answers_429_with_retry_after_and_cancel_frees_it():
    pipe = tiny_pipe()
    gate = gated(pipe)
    with make_client({"tiny": pipe}, queue_size=2) as client:
        running = client.post("/api/jobs", json={"steps": 2}).json()
        assert gate.entered.wait(10)
        queued = [client.post("/api/jobs", json={"steps": 2}) for _ in range(2)]
        assert [q.status_code for q in queued] == [202, 202] and queued[1].json()["position"] == 1
        full = client.post("/api/jobs", json={"steps": 2})
        assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1 and full.json()["error"]["code"] == "queue_full"
        cancelled = client.delete(f"/api/jobs/{queued[0].json()['id']}").json()
        assert cancelled["status"] == "cancelled"
        assert client.post("/api/jobs", json={"steps": 2}).status_code == 202  # the cancelled one left room
        client.delete(f"/api/jobs/{running['id']}")  # a running job stops at its next step
        gate.open.set()
        wait_for(lambda: client.get(f"/api/jobs/{running['id']}").json()["status"] == "cancelled")
        wait_for(lambda: client.get(f"/api/jobs/{queued[1].json()['id']}").json()["status"] == "done")  # the queue moves on


def test_the_api_key_guards_the_api_but_not_the_page():
    with make_client(api_key="s3cret") as client:
        assert client.get("/").status_code == 200
        denied = client.get("/api/models")
        assert denied.status_code == 401 and "Authorization: Bearer" in denied.json()["error"]["message"]
        assert client.get("/api/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/api/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.post("/v1/images/generations", json={"prompt": "a"}).status_code == 401


def test_a_server_on_localhost_refuses_other_host_names(client):
    with make_client(allowed_hosts=["127.0.0.1", "localhost"]) as local:
        assert local.get("/api/health", headers={"host": "127.0.0.1:7860"}).status_code == 200
        assert local.get("/api/health", headers={"host": "evil.example:7860"}).status_code == 421  # DNS rebinding


def test_a_client_that_disconnects_cancels_its_job():
    httpx = pytest.importorskip("httpx")
    pipes = {"tiny": tiny_pipe(), "chars": tiny_pipe(text=True)}
    gates = {name: gated(pipe) for name, pipe in pipes.items()}
    with make_client(pipes) as local, running_server(local.app) as url:
        jobs = local.app.state.server.jobs
        job = httpx.post(f"{url}/api/jobs", json={"steps": 3}).json()
        assert gates["tiny"].entered.wait(10)  # running, held in its first step
        with httpx.stream("GET", f"{url}/api/jobs/{job['id']}/events") as stream:
            next(stream.iter_lines())  # watching it; then this client goes away
        wait_for(lambda: jobs[job["id"]].cancel_requested.is_set())  # noticed at the next keep-alive
        gates["tiny"].open.set()
        wait_for(lambda: jobs[job["id"]].status == "cancelled")
        with pytest.raises(httpx.ReadTimeout):  # an OpenAI-style client that gives up waiting
            httpx.post(f"{url}/v1/images/generations", json={"prompt": "ab", "model": "chars"}, timeout=1.0)
        waiting = next(j for j in jobs.values() if j.model == "chars")
        wait_for(lambda: waiting.cancel_requested.is_set())
        gates["chars"].open.set()
        wait_for(lambda: waiting.status == "cancelled")
        assert httpx.post(f"{url}/api/jobs", json={"steps": 2}).status_code == 202  # and it keeps serving


def test_the_official_openai_client_works_against_the_server():
    openai = pytest.importorskip("openai")
    with make_client() as local, running_server(local.app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny", "chars"]
        result = client.images.generate(model="chars", prompt="ab", n=2, size="8x8", response_format="b64_json", extra_body={"seed": 3})
        images = [Image.open(io.BytesIO(base64.b64decode(item.b64_json))) for item in result.data]
        assert [image.size for image in images] == [(8, 8), (8, 8)]
        assert parse_parameters(images[1].info["parameters"])["Image index"] == 1
        again = client.images.generate(model="chars", prompt="ab", n=1, extra_body={"seed": 3})  # the model's own size by default
        alone = Image.open(io.BytesIO(base64.b64decode(again.data[0].b64_json)))
        assert np.abs(np.asarray(alone).astype(int) - np.asarray(images[0]).astype(int)).max() <= 1  # alone vs in a batch of 2
        linked = client.images.generate(model="chars", prompt="ab", response_format="url")
        assert linked.data[0].url.startswith(url + "/api/images/")
        with pytest.raises(openai.BadRequestError, match="square images"):
            client.images.generate(model="chars", prompt="ab", size="8x16")
        with pytest.raises(openai.BadRequestError, match="unknown model 'dall-e-3'"):
            client.images.generate(model="dall-e-3", prompt="ab")


def test_serve_binds_to_localhost_unless_told_otherwise():
    from diffusekit.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.port == 7860 and args.api_key is None and args.queue == 8
