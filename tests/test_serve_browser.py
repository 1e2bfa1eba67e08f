"""The page in a real browser: Debian's chromium, headless, driven by Playwright for Python, against a real
server with the shipped emoji model. It generates an image, finds it in the gallery with its prompt in its
PNG, then paints a mask with the brush and inpaints; a screenshot is saved. Another test restarts the server over
the same outputs folder, finds the image in the gallery again and deletes it with its button.

Needs /usr/bin/chromium (`make browser`, or apt-get install chromium) and the pip package playwright;
without them the test is skipped and says which one is missing.
"""

from __future__ import annotations

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
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = open_browser(playwright, tmp_path / "profile")
        page = browser.new_page()
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(studio)
        page.wait_for_selector("#model option[value='emoji-t2i']", state="attached")
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
        browser.close()
    assert errors == []


def test_an_image_is_in_the_gallery_after_a_restart_and_its_delete_button_moves_it_to_trash(pipes, tmp_path):
    from playwright.sync_api import sync_playwright

    folder, errors = tmp_path / "outputs", []
    with sync_playwright() as playwright:
        browser = open_browser(playwright, tmp_path / "profile")
        page = browser.new_page()
        page.on("pageerror", lambda err: errors.append(str(err)))
        with serving(pipes, folder) as url:
            page.goto(url)
            page.wait_for_selector("#model option[value='emoji-t2i']", state="attached")
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
        browser.close()
    assert errors == []


def test_the_inside_panel_draws_the_schedule_and_a_word_of_the_prompt_shows_its_attention_over_the_image(studio, tmp_path):
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = open_browser(playwright, tmp_path / "profile")
        page = browser.new_page()
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(studio)
        page.wait_for_selector("#model option[value='emoji-t2i']", state="attached")
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
        browser.close()
    assert errors == []
