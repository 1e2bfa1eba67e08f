"""ControlNets in `diffusekit serve`: a job's "control" entries, POST /api/annotate, /api/models' ControlNets, `serve
--controlnet`, and the mistakes a client can make (each a 4xx JSON error naming the field)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from conftest import perturb
from PIL import Image, ImageDraw
from serve_helpers import tiny_pipe
from test_serve import data_url, events

from diffusekit.images import parse_parameters
from diffusekit.nn.controlnet import ControlNet
from diffusekit.serve import Limits, Server, create_app

pytest.importorskip("fastapi")
pytest.importorskip("cv2")
from fastapi.testclient import TestClient  # noqa: E402


def with_controlnet(pipe, name: str = "edges", seed: int = 3):
    """The pipe with a tiny ControlNet of its U-Net whose zero convolutions are randomised, so that a control changes the image."""
    pipe.add_controlnet(perturb(ControlNet.from_unet(pipe.net, pipe.config.model, embedding_channels=(8,)), seed, 0.3), name)
    return pipe


@pytest.fixture(scope="module")
def client():
    pipes = {"chars": with_controlnet(tiny_pipe(text=True)), "plain": tiny_pipe()}
    with TestClient(create_app(Server(pipes, Limits()))) as c:
        yield c


def square(size: int = 8) -> Image.Image:
    """A white square outline on black: white lines on black, as edge and scribble ControlNets expect."""
    image = Image.new("RGB", (size, size))
    ImageDraw.Draw(image).rectangle([size // 4, size // 4, size - 1 - size // 4, size - 1 - size // 4], outline="white")
    return image


def run_job(client, **body) -> dict:
    job = client.post("/api/jobs", json={"model": "chars", "prompt": "ab", "steps": 4, "seed": 5, **body})
    assert job.status_code == 202, job.text
    assert events(client, job.json()["id"])[-1]["event"] == "done"
    return client.get(f"/api/jobs/{job.json()['id']}").json()


def image_and_parameters(client, job: dict) -> tuple[np.ndarray, dict]:
    png = Image.open(io.BytesIO(client.get(job["images"][0]["url"]).content))
    return np.asarray(png).astype(int), parse_parameters(png.info["parameters"])


def test_models_list_their_controlnets(client):
    models = {m["name"]: m for m in client.get("/api/models").json()["models"]}
    assert models["chars"]["controlnets"] == ["edges"] and models["plain"]["controlnets"] == []


def test_a_job_with_control_differs_from_the_same_job_without_and_records_its_controlnet(client):
    plain, _ = image_and_parameters(client, run_job(client))
    job = run_job(client, control=[{"image": data_url(square()), "scale": 0.8, "end": 0.75}])
    steered, recorded = image_and_parameters(client, job)
    assert np.abs(steered - plain).max() > 8 and job["notes"] == []
    line = recorded["ControlNet 0"]
    assert line.startswith("Module: none, Model: edges [") and "Weight: 0.8, Guidance Start: 0, Guidance End: 0.75" in line
    again, _ = image_and_parameters(client, run_job(client, control=[{"image": data_url(square()), "scale": 0.8, "end": 0.75}]))
    assert np.array_equal(again, steered)  # the same control, the same image


def test_an_annotator_runs_on_the_control_and_a_control_of_another_size_is_resized_with_a_note(client):
    photo = Image.new("RGB", (32, 24), "black")
    ImageDraw.Draw(photo).ellipse([4, 2, 28, 22], fill="white")
    job = run_job(client, control=[{"image": data_url(photo), "controlnet": "edges", "annotator": "canny"}])
    _, recorded = image_and_parameters(client, job)
    assert recorded["ControlNet 0"].startswith("Module: canny, Model: edges [")
    assert len(job["notes"]) == 1 and "32x24" in job["notes"][0] and "8x8" in job["notes"][0]


def test_annotate_returns_the_edges_as_a_png_of_the_size_asked(client):
    photo = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(photo).rectangle([16, 16, 47, 47], fill="white")
    answer = client.post("/api/annotate", json={"image": data_url(photo), "annotator": "canny"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    edges = np.asarray(Image.open(io.BytesIO(answer.content)).convert("L"))
    assert edges.shape == (64, 64) and edges[20:44, 20:44].max() == 0 and edges[0:10].max() == 0  # nothing inside or far outside
    assert edges[14:18, 16:48].max() == 255 and edges[16:48, 46:50].max() == 255  # the square's top and right sides
    small = client.post("/api/annotate", json={"image": data_url(photo), "annotator": "scribble", "size": 32})
    scribble = np.asarray(Image.open(io.BytesIO(small.content)).convert("L"))
    assert scribble.shape == (32, 32) and 0 < (scribble > 127).mean() < 0.5


def test_serve_loads_a_controlnet_into_the_models_it_fits(tmp_path, capsys):
    from diffusekit.cli.serving import load_controlnets
    from diffusekit.errors import UserError
    from diffusekit.io.controlnet import write_controlnet

    text = tiny_pipe(text=True)
    write_controlnet(ControlNet.from_unet(text.net, text.config.model, embedding_channels=(8,)), tmp_path / "fresh")
    pipes = {"chars": text, "plain": tiny_pipe()}  # the plain model has no cross-attention: the ControlNet does not fit it
    load_controlnets(pipes, [str(tmp_path / "fresh")])
    assert list(text.controlnets) == ["fresh"] and not pipes["plain"].controlnets
    assert "ControlNet fresh on chars" in capsys.readouterr().out
    with pytest.raises(UserError, match="fits none of the served models"):
        load_controlnets({"plain": tiny_pipe()}, [str(tmp_path / "fresh")])


GOOD = data_url(square())
BAD_CONTROLS = [  # (body, the field named, a fragment of the message)
    ({"control": [{"image": GOOD, "scale": "strong"}]}, "control.0.scale", "valid number"),
    ({"control": [{"image": GOOD, "scale": 5}]}, "control.0.scale", "0 to 2"),
    ({"control": [{"image": GOOD, "scale": -0.5}]}, "control.0.scale", "0 to 2"),
    ({"control": [{"image": GOOD, "start": 0.8, "end": 0.2}]}, "control.0.end", "0 <= start < end <= 1"),
    ({"control": [{"image": GOOD, "controlnet": "pose"}]}, "control.0.controlnet", "it has: edges"),
    ({"control": [{"image": GOOD}, {"image": GOOD}]}, "control.1.controlnet", "two control images"),
    ({"control": [{"image": base64.b64encode(b"not an image").decode()}]}, "control.0.image", "PNG, JPEG or WebP"),
    ({"control": [{"image": "%%%"}]}, "control.0.image", "not base64"),
    ({"control": [{"image": GOOD, "annotator": "depth"}]}, "control.0.annotator", "'none', 'canny' or 'scribble'"),
    ({"control": [{"scale": 1}]}, "control.0.image", "Field required"),
    ({"model": "plain", "prompt": "", "control": [{"image": GOOD}]}, "control", "has no ControlNet"),
]


@pytest.mark.parametrize("body, field, fragment", BAD_CONTROLS)
def test_bad_controls_are_400_naming_the_field_and_the_server_keeps_serving(client, body, field, fragment):
    answer = client.post("/api/jobs", json={"model": "chars", "prompt": "ab", "steps": 2, **body})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == field and fragment in error["message"], error
    assert client.get("/api/health").json()["status"] == "ok"


@pytest.mark.parametrize("body, field, fragment", [
    ({"image": "%%%"}, "image", "not base64"),
    ({"image": GOOD, "annotator": "hed"}, "annotator", "'none', 'canny' or 'scribble'"),
    ({"image": GOOD, "size": 100000}, "size", "8 to 4096"),
    ({"annotator": "canny"}, "image", "Field required"),
])
def test_bad_annotate_requests_are_400_naming_the_field(client, body, field, fragment):
    answer = client.post("/api/annotate", json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == field and fragment in answer.json()["error"]["message"]


def test_a_lone_surrogate_in_a_controlnet_name_is_a_400_naming_it(client):
    body = '{"model": "chars", "prompt": "ab", "control": [{"image": "%s", "controlnet": "\\ud800"}]}' % GOOD
    answer = client.post("/api/jobs", content=body.encode(), headers={"content-type": "application/json"})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "control.0.controlnet"


def test_with_two_controlnets_a_job_names_the_one_that_steers_and_only_that_one_acts():
    pipe = with_controlnet(with_controlnet(tiny_pipe(text=True), "edges", 3), "pose", 4)
    with TestClient(create_app(Server({"chars": pipe}, Limits()))) as two:
        unnamed = two.post("/api/jobs", json={"prompt": "ab", "control": [{"image": GOOD}]})
        assert unnamed.status_code == 400 and unnamed.json()["error"]["param"] == "control.0.controlnet"
        assert "edges, pose" in unnamed.json()["error"]["message"]
        pose, recorded = image_and_parameters(two, run_job(two, control=[{"image": GOOD, "controlnet": "pose"}]))
        assert recorded["ControlNet 0"].startswith("Module: none, Model: pose [") and "ControlNet 1" not in recorded
        edges, _ = image_and_parameters(two, run_job(two, control=[{"image": GOOD, "controlnet": "edges"}]))
        both, recorded = image_and_parameters(two, run_job(two, control=[{"image": GOOD, "controlnet": "pose"},
                                                                         {"image": GOOD, "controlnet": "edges"}]))
        assert "Model: edges [" in recorded["ControlNet 1"] and not np.array_equal(pose, edges) and not np.array_equal(both, pose)
