"""AUTOMATIC1111's /sdapi/v1 on `diffusekit serve`: the real `webuiapi` client against a real uvicorn (txt2img,
img2img with a mask, switching the model, progress while a job runs, interrupt, png-info, the API key), and bad
input through httpx (FastAPI's TestClient): one JSON error naming the A1111 field."""

from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from serve_helpers import running_server, tiny_pipe, wait_for

from diffusekit.serve import Limits, Server, create_app
from diffusekit.serve.a1111_names import resolve

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

webuiapi = pytest.importorskip("webuiapi")


def make_server(pipes=None, **options) -> Server:
    return Server(pipes or {"tiny": tiny_pipe(), "chars": tiny_pipe(text=True)}, options.pop("limits", Limits()), **options)


@pytest.fixture
def client():
    with TestClient(create_app(make_server())) as c:
        yield c


def a1111(url: str, **options):
    return webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", sampler="Euler a", steps=3, **options)


def png_of(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class Stepper(torch.nn.Module):
    """Wraps a network so that each call waits for the test to allow one more (a job held at a known step)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.allowed = net, threading.Semaphore(0)

    def forward(self, x, t, **cond):
        if not self.allowed.acquire(timeout=30):
            raise TimeoutError("the test never allowed this network call")
        return self.net(x, t, **cond)


def test_txt2img_with_the_webuiapi_client_answers_images_whose_parameters_are_the_infotexts():
    server = make_server()
    with TestClient(create_app(server)) as local, running_server(local.app) as url:
        api = a1111(url)
        result = api.txt2img(prompt="ab", width=8, height=8, batch_size=2, n_iter=2, seed=7, cfg_scale=2.5,
                             override_settings={"sd_model_checkpoint": "chars"})
        assert [image.size for image in result.images] == [(8, 8)] * 4
        info = result.info
        assert [image.info["parameters"] for image in result.images] == info["infotexts"]
        assert info["all_seeds"] == [7] * 4 and info["all_image_indexes"] == [0, 1, 2, 3] and info["sd_model_name"] == "chars"
        assert info["sampler_name"] == "Euler a" and info["steps"] == 3 and info["cfg_scale"] == 2.5 and info["all_prompts"] == ["ab"] * 4
        assert info["ignored"] == [] and "Sampler: euler_ancestral" in info["infotexts"][3] and "Image index: 3" in info["infotexts"][3]
        assert result.parameters["seed"] == 7 and result.parameters["override_settings"]["sd_model_checkpoint"].startswith("chars [")
        gallery = [image["parameters"] for image in local.get("/api/images").json()["images"]]
        assert set(info["infotexts"]) <= set(gallery)  # the same images, in the server's gallery
        alone = api.txt2img(prompt="ab", width=8, height=8, seed=7, cfg_scale=2.5, override_settings={"sd_model_checkpoint": "chars"})
        assert np.array_equal(np.asarray(alone.image), np.asarray(result.images[0]))  # image 0 of seed 7, whatever the batch
        assert api.png_info(result.images[2]).info == info["infotexts"][2]
        assert "DPM++ 2M" in api.util_get_sampler_names() and "karras" in api.util_get_scheduler_names() and api.get_upscalers() == []


def test_img2img_with_a_mask_repaints_only_the_masked_part():
    with TestClient(create_app(make_server())) as local, running_server(local.app) as url:
        init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8))
        mask = np.zeros((8, 8), np.uint8)
        mask[:, 5:] = 255
        result = a1111(url).img2img(images=[init], mask_image=Image.fromarray(mask), mask_blur=0, inpainting_fill=1, denoising_strength=1.0,
                                    width=8, height=8, steps=4, seed=1, cfg_scale=1)
        out = np.asarray(result.image)
        assert np.array_equal(out[:, :5], np.asarray(init)[:, :5]) and not np.array_equal(out[:, 5:], np.asarray(init)[:, 5:])
        assert result.info["denoising_strength"] == 1.0 and result.image.info["parameters"] == result.info["infotexts"][0]
        assert result.info["ignored"] == ["inpaint_full_res"]  # A1111's "only masked" is not done: the whole picture is
        assert result.parameters["init_images"] is None and result.parameters["mask"] is None  # not sent back unless asked


def test_options_switch_the_model_and_an_override_picks_one_for_a_request():
    with TestClient(create_app(make_server())) as local, running_server(local.app) as url:
        api = a1111(url)
        assert api.util_get_current_model().startswith("tiny [")
        assert sorted(model["model_name"] for model in api.get_sd_models()) == ["chars", "tiny"]
        api.util_set_model("chars")  # webuiapi picks the title and posts it to /options
        assert api.util_get_current_model().startswith("chars [")
        assert api.txt2img(prompt="ab", width=8, height=8).info["sd_model_name"] == "chars"
        tiny = api.txt2img(prompt="", width=8, height=8, override_settings={"sd_model_checkpoint": "tiny"})
        assert tiny.info["sd_model_name"] == "tiny" and tiny.info["ignored"] == ["cfg_scale"]  # tiny takes no prompt to guide to
        assert api.util_get_current_model().startswith("chars [")  # an override lasts one request (restore_afterwards)
        refused = api.set_options({"sd_model_checkpoint": "sd_xl_base_1.0.safetensors"})
        assert refused["error"]["param"] == "sd_model_checkpoint" and "this server has: 'tiny [" in refused["error"]["message"]


def test_progress_while_a_job_runs_and_interrupt_cancels_it():
    tiny = tiny_pipe()
    stepper = Stepper(tiny.denoiser.net)
    tiny.denoiser.net = stepper
    with TestClient(create_app(make_server({"tiny": tiny}))) as local, running_server(local.app) as url:
        api, outcome = a1111(url), {}

        def generate():
            try:
                api.txt2img(width=8, height=8, steps=4, sampler_name="Euler", cfg_scale=1)
            except RuntimeError as err:
                outcome["error"] = err.args

        thread = threading.Thread(target=generate)
        thread.start()
        stepper.allowed.release(2)  # two steps of four, then it waits in the third
        wait_for(lambda: api.get_progress()["state"]["sampling_step"] == 2)
        progress = api.get_progress()
        assert progress["progress"] == 0.5 and progress["state"]["sampling_steps"] == 4 and progress["state"]["job_count"] == 1
        assert progress["eta_relative"] > 0 and progress["textinfo"] == "tiny: step 2 of 4"
        assert Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).size == (8, 8)  # the x0 preview
        assert api.get_progress()["state"]["interrupted"] is False
        assert len(api.interrupt()["interrupted"]) == 1
        stepper.allowed.release(10)
        thread.join(30)
        status, text = outcome["error"]
        assert status == 409 and "interrupted" in json.loads(text)["error"]["message"]
        idle = api.get_progress()
        assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
        stepper.allowed.release(100)
        assert len(api.txt2img(width=8, height=8, steps=2, cfg_scale=1).images) == 1  # and it keeps serving


def test_the_api_key_guards_sdapi_and_a1111_clients_send_it_as_a_password():
    with TestClient(create_app(make_server(api_key="s3cret"))) as local, running_server(local.app) as url:
        with pytest.raises(RuntimeError) as refused:
            a1111(url).txt2img(width=8, height=8, cfg_scale=1)
        assert refused.value.args[0] == 401
        assert len(a1111(url, username="anyone", password="s3cret").txt2img(width=8, height=8, cfg_scale=1).images) == 1
        assert local.get("/sdapi/v1/options", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_a_web_page_of_another_site_cannot_interrupt(client):
    assert client.post("/sdapi/v1/interrupt", headers={"Origin": "https://evil.example"}).status_code == 403
    assert client.post("/sdapi/v1/skip", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert client.post("/sdapi/v1/interrupt").json() == {"interrupted": []}


def test_samplers_and_schedulers_map_to_diffusekit():
    assert (resolve("DPM++ 2M Karras", None).sampler.ours, resolve("DPM++ 2M Karras", "Uniform").scheduler.spacing) == ("dpmpp_2m", "karras")
    assert resolve("DPM++ 2M", "Karras").scheduler.spacing == "karras" and resolve("Euler a", "automatic").scheduler.spacing is None
    assert resolve("Euler SGM Uniform", None).scheduler.name == "sgm_uniform" and resolve("dpmpp_2m_sde", None).sampler.name == "DPM++ 2M SDE"
    assert resolve("DPM2", None).notes and not resolve("UniPC", None).notes and resolve("LCM", None).sampler.ours == "consistency"


def test_unknown_fields_are_ignored_and_listed(client):
    answer = client.post("/sdapi/v1/txt2img", json={"width": 8, "steps": 2, "hires_magic": 1, "tiling": True, "subseed": 4, "subseed_strength": 0.5,
                                                      "override_settings": {"CLIP_stop_at_last_layers": 2}, "send_images": False})
    assert answer.status_code == 200 and answer.json()["images"] == []
    info = json.loads(answer.json()["info"])
    assert info["ignored"] == ["subseed_strength", "tiling", "subseed", "override_settings.CLIP_stop_at_last_layers", "hires_magic"]
    assert any("subseed" in note for note in info["notes"]) and info["width"] == info["height"] == 8


SMALL = png_of(Image.new("L", (8, 8)))
BAD_REQUESTS = [  # (path, body, status, the field named, a fragment of the message)
    ("txt2img", {"steps": "many"}, 400, "steps", "valid integer"),
    ("txt2img", {"cfg_scale": [7]}, 400, "cfg_scale", "valid number"),
    ("txt2img", {"batch_size": 1.5}, 400, "batch_size", "valid integer"),
    ("txt2img", {"width": 8, "height": 16}, 400, "height", "square images"),
    ("txt2img", {"width": 512, "height": 512}, 400, "width", "up to 32 here"),
    ("txt2img", {"steps": 101}, 400, "steps", "1 to 100"),
    ("txt2img", {"batch_size": 3, "n_iter": 3}, 400, "batch_size", "batch_size x n_iter: n = 9: ask for 1 to 8"),
    ("txt2img", {"n_iter": 0}, 400, "n_iter", "use 1 or more"),
    ("txt2img", {"prompt": "a cat"}, 400, "prompt", "not text-conditioned"),
    ("txt2img", {"sampler_name": "PLMS"}, 400, "sampler_name", "this server has: DPM++ 2M"),
    ("txt2img", {"scheduler": "Beta"}, 400, "scheduler", "this server has: Automatic"),
    ("txt2img", {"seed": -7}, 400, "seed", "random"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "v1-5-pruned.safetensors"}}, 400, "override_settings.sd_model_checkpoint",
     "this server has: 'tiny ["),
    ("txt2img", {"override_settings": "chars"}, 400, "override_settings", "valid dictionary"),
    ("img2img", {"width": 8}, 400, "init_images", "needs an image"),
    ("img2img", {"init_images": ["***"]}, 400, "init_images", "not base64"),
    ("img2img", {"init_images": [SMALL], "denoising_strength": 1.5}, 400, "denoising_strength", "(0, 1]"),
    ("img2img", {"init_images": [SMALL], "mask": png_of(Image.new("L", (4, 4)))}, 400, "mask", "the mask is 4x4 pixels"),
    ("img2img", {"init_images": [SMALL], "mask": SMALL, "inpainting_fill": 7}, 400, "inpainting_fill", "1 (original)"),
    ("options", {"sd_model_checkpoint": "nope"}, 400, "sd_model_checkpoint", "is not served here"),
    ("png-info", {"image": base64.b64encode(b"%PDF-1.4").decode()}, 400, "image", "not a PNG, JPEG or WebP"),
]


@pytest.mark.parametrize("path, body, status, field, fragment", BAD_REQUESTS)
def test_a_bad_request_is_one_json_error_naming_the_a1111_field(client, path, body, status, field, fragment):
    answer = client.post(f"/sdapi/v1/{path}", json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == field and fragment in error["message"], error
    assert client.post("/sdapi/v1/txt2img", json={"width": 8, "steps": 2}).status_code == 200  # and it keeps serving


def test_a_full_queue_is_a_429_as_on_the_other_apis():
    tiny = tiny_pipe()
    stepper = Stepper(tiny.denoiser.net)
    tiny.denoiser.net = stepper
    with TestClient(create_app(make_server({"tiny": tiny}, queue_size=1))) as local, running_server(local.app) as url:
        import httpx

        threads = [threading.Thread(target=httpx.post, args=(f"{url}/sdapi/v1/txt2img",), kwargs={"json": {"steps": 2}, "timeout": 60})
                   for _ in range(2)]
        threads[0].start()
        wait_for(lambda: local.get("/sdapi/v1/progress").json()["state"]["job"] != "")  # running, held at its first step
        threads[1].start()
        wait_for(lambda: local.get("/sdapi/v1/progress").json()["state"]["job_count"] == 2)  # and one waits
        full = httpx.post(f"{url}/sdapi/v1/txt2img", json={"steps": 2})
        assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
        stepper.allowed.release(100)
        for thread in threads:
            thread.join(30)


def test_a_lone_surrogate_deep_in_a_field_is_a_400_before_anything_runs(client):
    for body, field in ((b'{"styles": ["\\ud800"]}', "styles"), (b'{"override_settings": {"sd_model_checkpoint": "\\udfff"}}', "override_settings"),
                        (b'{"alwayson_scripts": {"\\ud800": {}}}', "alwayson_scripts")):
        answer = client.post("/sdapi/v1/txt2img", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == field and "surrogate" in answer.json()["error"]["message"]
    assert client.app.state.server.jobs == {}


def test_an_image_made_through_sdapi_is_in_the_gallery_after_a_restart(tmp_path):
    from diffusekit.serve.gallery import Gallery

    pipes = {"tiny": tiny_pipe()}
    with TestClient(create_app(make_server(pipes, gallery=Gallery(folder=tmp_path)))) as first:
        made = json.loads(first.post("/sdapi/v1/txt2img", json={"width": 8, "steps": 2, "seed": 3}).json()["info"])["infotexts"][0]
    with TestClient(create_app(make_server(pipes, gallery=Gallery(folder=tmp_path)))) as again:  # a new server over the same folder
        assert made in [image["parameters"] for image in again.get("/api/images").json()["images"]]
