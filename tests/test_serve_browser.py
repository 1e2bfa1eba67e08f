"""The page in a real browser: Debian's chromium, headless, driven by Playwright for Python, against a real
server with the shipped emoji model. It generates an image, finds it in the gallery with its prompt in its
PNG, then paints a mask with the brush and inpaints; a screenshot is saved. Others restart the server over the same
outputs folder, find the image in the gallery again and delete it with its button; draw the noise schedule and a
word's attention map (the inside panel); draw a scribble on the control canvas and generate with it.

Needs /usr/bin/chromium (`make browser`, or apt-get install chromium) and the pip package playwright;
without them the test is skipped and says which one is missing.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest
from PIL import Image
from serve_helpers import running_server

from diffusekit.images import parse_parameters

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def open_browser(playwright, profile: Path):
    """Chromium with a new empty profile folder (Playwright's own browser download cannot work offline)."""
    return playwright.chromium.launch_persistent_context(str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
                                                         viewport={"width": 1280, "height": 860})


@contextlib.contextmanager
def browser_page(profile: Path):
    """A page of a fresh headless chromium; the page's script errors are collected, and there must be none at the end."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = open_browser(playwright, profile)
        page = browser.new_page()
        page.on("pageerror", lambda err: errors.append(str(err)))
        yield page
        browser.close()
    assert errors == []


def open_studio(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("#model option[value='emoji-t2i']", state="attached")


def need_a_browser() -> None:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed at /usr/bin/chromium (run `make browser` or `apt-get install chromium`)")
    pytest.importorskip("playwright.sync_api", reason="the pip package playwright is not installed (pip install playwright)")


@pytest.fixture(scope="module")
def pipes():
    need_a_browser()
    from diffusekit.serve import load_pipes

    return load_pipes([], device="cpu")


def serving(pipes, folder=None):
    """A real server over the shipped model; with `folder`, its outputs folder."""
    from diffusekit.serve import Limits, Server, create_app
    from diffusekit.serve.gallery import Gallery

    return running_server(create_app(Server(pipes, Limits(), gallery=Gallery(folder=folder))))


@pytest.fixture(scope="module")
def studio(pipes):
    with serving(pipes) as url:
        yield url


def test_the_page_generates_an_image_shows_it_in_the_gallery_and_inpaints_with_the_brush(studio, tmp_path):
    with browser_page(tmp_path / "profile") as page:
        open_studio(page, studio)
        assert page.input_value("#size") == "32" and page.input_value("#sampler") == "dpmpp_2m"
        page.fill("#prompt", "red apple")
        page.fill("#steps", "6")
        page.click("#generate")
        first = page.wait_for_selector("#gallery-items .item img", timeout=120_000)
        assert page.get_attribute("#preview", "src").startswith(("data:image/png", "blob:"))  # the live x0 preview, then the image
        image_id = page.get_attribute("#gallery-items .item", "data-image-id")
        png = page.request.get(f"{studio}/api/images/{image_id}.png")
        recorded = parse_parameters(Image.open(io.BytesIO(png.body())).info["parameters"])
        assert recorded["prompt"] == "red apple" and recorded["Steps"] == 6 and recorded["Model"] == "emoji-t2i"
        assert "red apple" in page.inner_text("#details-text")

        first.click()
        page.click("#use-init")
        page.wait_for_selector("#canvas-box:not([hidden])")
        box = page.locator("#mask-canvas").bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.2)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.9, box["y"] + box["height"] * 0.8, steps=8)
        page.mouse.up()
        page.fill("#prompt", "rocket")
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('#gallery-items .item').length >= 2", timeout=120_000)
        newest = page.get_attribute("#gallery-items .item", "data-image-id")
        recorded = parse_parameters(Image.open(io.BytesIO(page.request.get(f"{studio}/api/images/{newest}.png").body())).info["parameters"])
        assert recorded["prompt"] == "rocket" and "Denoising strength" in recorded and "Mask blur" in recorded
        shot = Path(os.environ.get("DIFFUSEKIT_SCREENSHOT", tmp_path / "studio.png"))
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000


def test_an_image_is_in_the_gallery_after_a_restart_and_its_delete_button_moves_it_to_trash(pipes, tmp_path):
    folder = tmp_path / "outputs"
    with browser_page(tmp_path / "profile") as page:
        with serving(pipes, folder) as url:
            open_studio(page, url)
            page.fill("#prompt", "rocket")
            page.fill("#steps", "2")
            page.click("#generate")
            page.wait_for_selector("#gallery-items .item img", timeout=120_000)
            image_id = page.get_attribute("#gallery-items .item", "data-image-id")
        assert [p.name.endswith(f"-{image_id}.png") for p in folder.glob("*/*.png")] == [True]

        with serving(pipes, folder) as url:  # a new server over the same folder: the same image, the same id
            page.goto(url)
            item = page.wait_for_selector(f"#gallery-items .item[data-image-id='{image_id}'] img", timeout=30_000)
            assert "saved in" in page.inner_text("#gallery-info") and page.is_hidden("#notice")
            item.click()
            assert "rocket" in page.inner_text("#details-text")
            page.click(f"#gallery-items .item[data-image-id='{image_id}'] .delete")
            page.wait_for_selector(f"#gallery-items .item[data-image-id='{image_id}']", state="detached")
            assert "trash/" in page.inner_text("#status")
        assert not list(folder.glob("2*/*.png")) and len(list((folder / "trash").glob("*/*.png"))) == 1

        blocker = tmp_path / "a-file"
        blocker.write_text("")
        with pytest.warns(Warning, match="is a file"), serving(pipes, blocker) as url:  # an outputs folder that cannot be: a notice
            page.goto(url)
            page.wait_for_selector("#notice:not([hidden])")
            assert "is a file" in page.inner_text("#notice") and "memory only" in page.inner_text("#gallery-info")


def test_the_inside_panel_draws_the_schedule_and_a_word_of_the_prompt_shows_its_attention_over_the_image(studio, tmp_path):
    with browser_page(tmp_path / "profile") as page:
        open_studio(page, studio)
        steps = int(page.input_value("#steps"))
        page.wait_for_function(f"document.querySelectorAll('#schedule-chart circle').length === {2 * steps}")  # a dot per step on each curve
        page.fill("#steps", "4")
        page.wait_for_function("document.querySelectorAll('#schedule-chart circle').length === 8")
        curve = page.get_attribute("#schedule-chart polyline.log-snr", "points")
        assert len(curve.split()) == 1000 and "4 " in page.inner_text("#schedule-info")  # the model's 1000 timesteps

        page.fill("#prompt", "red apple")
        page.check("#attention")
        page.click("#generate")
        page.wait_for_selector("#tokens .token", timeout=120_000)
        assert [t.inner_text() for t in page.query_selector_all("#tokens .token")] == ["red", "apple"]
        assert page.is_hidden("#attention-overlay")
        page.click("#tokens .token:has-text('apple')")
        assert page.is_visible("#attention-overlay") and page.get_attribute("#attention-overlay", "src").startswith("data:image/png")
        apple = page.get_attribute("#attention-overlay", "src")
        page.click("#tokens .token:has-text('red')")
        assert page.get_attribute("#attention-overlay", "src") != apple  # each word its own map


def test_a_scribble_drawn_on_the_control_canvas_is_previewed_and_steers_the_job(pipes, tmp_path):
    from diffusekit.nn.controlnet import ControlNet, embedding_channels_for

    pipe = pipes["emoji-t2i"]  # a fresh ControlNet of the shipped model (its zero convolutions change nothing: the flow is tested)
    pipe.add_controlnet(ControlNet.from_unet(pipe.net, pipe.config.model, embedding_channels=embedding_channels_for(pipe.vae.downsample_factor)),
                        "scribbles")
    try:
        with serving(pipes) as url, browser_page(tmp_path / "profile") as page:
            page.goto(url)
            page.wait_for_selector("#control-panel:not([hidden])")
            assert page.input_value("#control-net") == "scribbles"
            page.click("#control-blank")
            box = page.locator("#control-canvas").bounding_box()
            page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.2)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] * 0.7, steps=10)
            page.mouse.up()  # the stroke ends: the preview of what the ControlNet sees
            page.wait_for_selector("#control-preview:not([hidden])")
            white = page.evaluate("""() => { const c = document.getElementById('control-canvas');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
                for (let i = 0; i < d.length; i += 4) if (d[i] > 127) n++; return [n, c.width * c.height]; }""")
            assert 0 < white[0] < white[1] / 2 and white[1] == 32 * 32  # a white line on black, at the output size
            page.fill("#prompt", "rocket")
            page.fill("#steps", "3")
            page.click("#generate")
            page.wait_for_selector("#gallery-items .item img", timeout=120_000)
            newest = page.get_attribute("#gallery-items .item", "data-image-id")
            recorded = parse_parameters(Image.open(io.BytesIO(page.request.get(f"{url}/api/images/{newest}.png").body())).info["parameters"])
            assert recorded["ControlNet 0"].startswith("Module: none, Model: scribbles [") and "done" in page.inner_text("#status")
    finally:
        pipe.unload_controlnet("scribbles")
