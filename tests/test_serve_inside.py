"""The studio's "inside" view over the API: the noise schedule endpoint against the library's closed forms and
Pipeline.sigmas, both live previews (x0_hat and x_t) in the progress events, a job's attention maps per token,
and the bad inputs of each."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from serve_helpers import gated, tiny_pipe
from test_serve import events

from diffusekit.models import build_net, default_model
from diffusekit.pipeline import Pipeline
from diffusekit.serve import Limits, Server, create_app
from diffusekit.serve.inside import step_previews

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402


def flow_pipe() -> Pipeline:
    config = tiny_config(diffusion__process="flow", diffusion__prediction="v", diffusion__beta_start=1e-4, diffusion__beta_end=0.02,
                         diffusion__shift=1.5, sample__spacing="linspace")
    torch.manual_seed(0)
    return Pipeline(config, build_net(config), "cpu")


@pytest.fixture(scope="module")
def pipes():
    return {"tiny": tiny_pipe(), "chars": tiny_pipe(text=True), "flow": flow_pipe()}


@pytest.fixture
def client(pipes):
    with TestClient(create_app(Server(pipes, Limits(max_steps=500)))) as c:
        yield c


def decoded(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


@pytest.mark.parametrize("steps, spacing", [(5, "karras"), (7, "leading"), (10, "trailing"), (3, "logsnr")])
def test_the_schedule_is_the_closed_form_and_its_marks_are_the_pipelines_sigmas(client, pipes, steps, spacing):
    pipe = pipes["tiny"]
    answer = client.get(f"/api/models/tiny/schedule?steps={steps}&schedule={spacing}")
    assert answer.status_code == 200, answer.text
    data = answer.json()
    abar = pipe.schedule.alphas_cumprod
    assert data["process"] == "ddpm" and data["t"] == list(range(100)) and data["steps"] == steps and data["schedule"] == spacing
    np.testing.assert_allclose(data["alpha_bar"], abar.numpy(), rtol=1e-12)
    np.testing.assert_allclose(data["log_snr"], torch.log(abar / (1 - abar)).numpy(), rtol=1e-10, atol=1e-12)
    sigmas = pipe.sigmas(steps, spacing)
    assert data["sigmas"] == sigmas.tolist() and len(data["marks"]["t"]) == steps
    called = sigmas[:-1]
    np.testing.assert_allclose(data["marks"]["log_snr"], (-2 * called.log()).numpy(), rtol=1e-10)  # log-SNR = -2 log sigma
    np.testing.assert_allclose(data["marks"]["alpha_bar"], (1 / (1 + called**2)).numpy(), rtol=1e-10)
    np.testing.assert_allclose(data["marks"]["t"], pipe.schedule.sigma_to_t(called).numpy())
    if spacing in ("leading", "trailing"):  # the marks of whole timesteps lie on the curve
        timesteps = pipe.schedule.timesteps(steps, spacing, pipe.config.sample.steps_offset)
        np.testing.assert_allclose(data["marks"]["t"], timesteps.double().numpy(), atol=1e-9)
        np.testing.assert_allclose(data["marks"]["alpha_bar"], abar[timesteps].numpy(), rtol=1e-10)


def test_the_schedule_defaults_to_the_models_settings_and_a_flow_model_has_its_own_curves(client, pipes):
    data = client.get("/api/models/tiny/schedule").json()
    config = pipes["tiny"].config.sample
    assert data["steps"] == config.steps and data["schedule"] == config.spacing and data["sigmas"] == pipes["tiny"].sigmas().tolist()
    flow = client.get("/api/models/flow/schedule?steps=4&size=16").json()
    t = np.array(flow["t"])
    assert flow["process"] == "flow" and 0 < t.min() and t.max() < 1
    np.testing.assert_allclose(flow["alpha_bar"], (1 - t) ** 2, rtol=1e-12)  # x_t = (1 - t) x0 + t eps
    np.testing.assert_allclose(flow["log_snr"], 2 * np.log((1 - t) / t), rtol=1e-10, atol=1e-12)
    assert flow["sigmas"] == pipes["flow"].sigmas(4, size=16).tolist() != pipes["flow"].sigmas(4).tolist()  # the size's time shift


@pytest.mark.parametrize("query, field, fragment", [
    ("steps=0", "steps", "1 to 500"), ("steps=many", "steps", "whole number"), ("steps=200", "steps", "has 100 timesteps"),
    ("schedule=magic", "schedule", "use one of: leading"), ("size=7", "size", "multiples of 2"),
])
def test_a_bad_schedule_query_is_a_400_naming_the_parameter(client, query, field, fragment):
    answer = client.get(f"/api/models/tiny/schedule?{query}")
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == field and fragment in error["message"]
    leading = client.get("/api/models/flow/schedule?schedule=leading").json()["error"]
    assert leading["param"] == "schedule" and "does not apply to a flow model" in leading["message"]
    assert client.get("/api/models/nope/schedule").json()["error"]["param"] == "model"


def test_progress_events_carry_the_x0_preview_and_the_noisy_x_t_beside_it(pipes):
    chars = tiny_pipe(text=True)
    gate = gated(chars)
    with TestClient(create_app(Server({"chars": chars}, Limits()))) as client:
        job = client.post("/api/jobs", json={"prompt": "ab", "n": 2, "steps": 4, "seed": 3})
        seen = events(client, job.json()["id"], on_first=gate.open.set)
    assert "noisy" in seen[0]
    with_previews = [e for e in seen if e["event"] == "progress" and e["preview"]]
    assert with_previews and all(e["noisy"] for e in with_previews)
    first = with_previews[0]
    x0_hat, x_t = decoded(first["preview"]), decoded(first["noisy"])
    assert x0_hat.size == x_t.size == (16, 8)  # the batch side by side, both
    assert not np.array_equal(np.asarray(x0_hat), np.asarray(x_t))
    assert all(e["noisy"] is None for e in seen if e["event"] == "progress" and not e["preview"])


def roughness(picture: Image.Image) -> float:
    """The mean absolute difference between neighbouring pixels: high for noise, low for a smooth image."""
    a = np.asarray(picture.convert("L"), dtype=np.float64)
    return float(np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean())


def test_a_latent_models_x_t_preview_is_its_noisy_latent_decoded_and_noisier_than_x0_hat():
    pipe = Pipeline.from_pretrained(default_model(), device="cpu")
    seen: list[dict] = []
    pipe("red apple", n=1, steps=4, seed=0, callback=lambda info: seen.append(step_previews(pipe, info)))
    first = seen[0]  # after one step of four: mostly noise, while x0-hat is already an image
    x_t, x0_hat = decoded(first["noisy"]), decoded(first["preview"])
    assert x_t.size == x0_hat.size == (32, 32) and x_t.mode == "RGB"
    assert roughness(x_t) > 1.5 * roughness(x0_hat)  # about 2x here; x0-hat in its place would be 1x


def test_the_inside_script_is_served_from_the_package_and_fetches_nothing_elsewhere(client):
    script = client.get("/inside.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "http://" not in script.text and "https://" not in script.text and '<script src="/inside.js">' in client.get("/").text


def test_a_job_with_attention_returns_a_different_map_for_each_token(client):
    job = client.post("/api/jobs", json={"model": "chars", "prompt": "ab", "n": 2, "steps": 3, "seed": 1, "attention": True})
    assert job.status_code == 202, job.text
    assert events(client, job.json()["id"])[-1]["event"] == "done"
    attention = client.get(f"/api/jobs/{job.json()['id']}").json()["attention"]
    assert attention["tokens"] == ["a", "b"] and len(attention["maps"]) == 2
    for image_maps in attention["maps"]:
        pictures = [np.asarray(decoded(url)) for url in image_maps]
        assert [p.shape for p in pictures] == [(8, 8, 4)] * 2  # RGBA over the 8 x 8 image
        assert pictures[0][..., 3].max() > 0 and not np.array_equal(pictures[0], pictures[1])
    plain = client.post("/api/jobs", json={"model": "chars", "prompt": "ab", "steps": 2})
    events(client, plain.json()["id"])
    assert client.get(f"/api/jobs/{plain.json()['id']}").json()["attention"] is None  # off by default


@pytest.mark.parametrize("body, fragment", [
    ({"model": "tiny", "attention": True}, "has no cross-attention"),
    ({"model": "chars", "prompt": "", "attention": True}, "give one prompt"),
    ({"model": "chars", "prompt": "ab", "attention": "yes please"}, "valid boolean"),
])
def test_attention_asked_wrongly_is_a_400_naming_the_field(client, body, fragment):
    answer = client.post("/api/jobs", json=body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "attention" and fragment in error["message"]


def test_only_the_newest_jobs_keep_their_attention_maps(client, monkeypatch):
    from diffusekit.serve import app

    monkeypatch.setattr(app, "MAX_ATTENTION_KEPT", 1)
    body = {"model": "chars", "prompt": "ab", "steps": 2, "attention": True}
    first = client.post("/api/jobs", json=body).json()["id"]
    events(client, first)
    assert client.get(f"/api/jobs/{first}").json()["attention"]["tokens"] == ["a", "b"]
    second = client.post("/api/jobs", json={**body, "prompt": "ba"}).json()["id"]
    events(client, second)
    assert client.get(f"/api/jobs/{first}").json()["attention"] is None  # memory stays bounded: older maps are dropped
    assert client.get(f"/api/jobs/{second}").json()["attention"]["tokens"] == ["b", "a"]
