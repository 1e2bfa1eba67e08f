"""Images that remember how they were made: the "parameters" text chunk (AUTOMATIC1111's layout),
`diffusekit info IMAGE.png`, `--from IMAGE.png`, and images handed to us read safely."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import assert_user_error, cli
from PIL import Image

from diffusekit.errors import UserError
from diffusekit.images import format_parameters, open_image, parse_parameters, png_bytes, read_parameters

A1111_TEXT = """masterpiece, a cat, (detailed:1.2)
on two lines
Negative prompt: blurry, lowres
Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.75, Lora hashes: "a: 1, b: 2", Version: v1.10.1"""


def test_an_automatic1111_parameters_text_is_read():
    fields = parse_parameters(A1111_TEXT)
    assert fields["prompt"] == "masterpiece, a cat, (detailed:1.2)\non two lines"
    assert fields["negative"] == "blurry, lowres"
    assert fields["Steps"] == 20 and fields["CFG scale"] == 7 and fields["Seed"] == 1234 and fields["Denoising strength"] == 0.75
    assert fields["Size"] == "512x768" and fields["Model hash"] == "6ce0161689" and fields["Lora hashes"] == "a: 1, b: 2"


def test_parameters_survive_a_round_trip_through_a_png():
    fields = {"Steps": 8, "Sampler": "dpmpp_2m", "CFG scale": 3.5, "Seed": 2**63 - 1, "Model": 'odd, "name": here', "Skipped": None}
    text = format_parameters("red apple 🍎, shiny", "green, dull", fields)
    assert "Skipped" not in text
    image = Image.open(io.BytesIO(png_bytes(Image.new("RGB", (4, 4)), text)))
    back = parse_parameters(image.info["parameters"])
    assert back == {"prompt": "red apple 🍎, shiny", "negative": "green, dull", "Steps": 8, "Sampler": "dpmpp_2m", "CFG scale": 3.5,
                    "Seed": 2**63 - 1, "Model": 'odd, "name": here'}


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


@pytest.mark.both_precisions
def test_sample_writes_parameters_into_every_png_and_from_makes_one_again(capsys, trained_run, tmp_path):
    code, out, _ = cli(capsys, "sample", trained_run, "--n", 4, "--steps", 3, "--sampler", "ddpm", "--seed", 5, "--out", tmp_path / "batch")
    assert code == 0 and "seed 5, images 0..3" in out
    recorded = read_parameters(tmp_path / "batch" / "sample_00002.png")
    assert recorded["Seed"] == 5 and recorded["Image index"] == 2 and recorded["Steps"] == 3 and recorded["Sampler"] == "ddpm"
    assert recorded["Model"] == "run" and len(str(recorded["Model hash"])) == 10 and recorded["Version"].startswith("diffusekit ")
    code, out, _ = cli(capsys, "info", tmp_path / "batch" / "sample_00002.png")
    assert code == 0 and "Seed: 5, Image index: 2" in out
    code, _, err = cli(capsys, "generate", "--model", trained_run, "--from", tmp_path / "batch" / "sample_00002.png", "--out", tmp_path / "again")
    assert code == 0, err
    again = tmp_path / "again" / "sample_00002.png"  # named by its index
    assert np.abs(pixels(again) - pixels(tmp_path / "batch" / "sample_00002.png")).max() <= 1  # batch of 4 vs alone: float rounding
    code, _, _ = cli(capsys, "generate", "--model", trained_run, "--from", again, "--steps", 4, "--out", tmp_path / "more")
    assert read_parameters(tmp_path / "more" / "sample_00002.png")["Steps"] == 4  # the command line wins


def test_a_grid_carries_the_parameters_of_its_first_image(capsys, trained_run, tmp_path):
    cli(capsys, "sample", trained_run, "--n", 4, "--steps", 2, "--seed", 3, "--out", tmp_path / "grid.png")
    recorded = read_parameters(tmp_path / "grid.png")
    assert recorded["Seed"] == 3 and recorded["Image index"] == 0 and recorded["Batch size"] == 4


@pytest.mark.both_precisions
def test_edit_with_a_mask_records_strength_and_from_needs_edit(capsys, trained_run, tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "init.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 4:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    code, _, err = cli(capsys, "edit", tmp_path / "init.png", "--model", trained_run, "--mask", tmp_path / "mask.png", "--steps", 4,
                       "--sampler", "ddim", "--out", tmp_path / "edited")
    assert code == 0, err
    made = tmp_path / "edited" / "sample_00000.png"
    assert np.array_equal(pixels(made)[:, :4], pixels(tmp_path / "init.png")[:, :4])  # kept where the mask is black
    recorded = read_parameters(made)
    assert recorded["Denoising strength"] == 1.0 and recorded["Mask blur"] == 0.0
    assert_user_error(cli(capsys, "generate", "--model", trained_run, "--from", made), "was made by `edit`", "--mask MASK.png")
    code, _, err = cli(capsys, "edit", tmp_path / "init.png", "--model", trained_run, "--mask", tmp_path / "mask.png", "--from", made,
                       "--out", tmp_path / "again")
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "again" / "sample_00000.png"), pixels(made))
    small = np.zeros((4, 4), np.uint8)
    Image.fromarray(small).save(tmp_path / "small.png")
    assert_user_error(cli(capsys, "edit", tmp_path / "init.png", "--model", trained_run, "--mask", tmp_path / "small.png"),
                      "the mask is 4x4 pixels but the image is 8x8")
    assert_user_error(cli(capsys, "edit", tmp_path / "init.png", "--model", trained_run, "--strength", "0.01", "--steps", 4), "leaves no step")


def test_info_on_an_image_without_parameters_says_so(capsys, tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    assert_user_error(cli(capsys, "info", tmp_path / "plain.png"), "carries no generation parameters")
    (tmp_path / "fake.png").write_bytes(b"not an image")
    assert_user_error(cli(capsys, "info", tmp_path / "fake.png"), "cannot read image")


@pytest.mark.both_precisions
def test_the_prompt_of_a_text_to_image_model_comes_back_with_from(capsys, tmp_path):
    code, _, err = cli(capsys, "generate", "red apple, shiny", "--negative", "green", "--n", 2, "--steps", 2, "--seed", 1, "--out", tmp_path / "g")
    assert code == 0, err
    code, _, err = cli(capsys, "generate", "--from", tmp_path / "g" / "sample_00001.png", "--out", tmp_path / "again")
    assert code == 0, err
    recorded = read_parameters(tmp_path / "again" / "sample_00001.png")
    assert recorded["prompt"] == "red apple, shiny" and recorded["negative"] == "green" and recorded["Model"] == "emoji-t2i"
    assert np.abs(pixels(tmp_path / "again" / "sample_00001.png") - pixels(tmp_path / "g" / "sample_00001.png")).max() <= 1


def test_images_handed_to_us_are_decoded_only_within_limits():
    bomb = io.BytesIO()
    Image.new("1", (6000, 6000)).save(bomb, format="PNG")  # a few kB that would decode to 36 M pixels
    assert len(bomb.getvalue()) < 100_000
    with pytest.raises(UserError, match="6000x6000 pixels, more than"):
        open_image(bomb.getvalue(), "init image")
    with pytest.raises(UserError, match="not a PNG, JPEG or WebP"):
        open_image(b"GIF89a" + b"\0" * 32, "init image")
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, format="GIF")
    with pytest.raises(UserError, match="not a PNG, JPEG or WebP"):
        open_image(gif.getvalue(), "mask")


@pytest.mark.both_precisions
def test_from_refuses_parameters_of_the_wrong_type_and_sample_takes_from_too(capsys, trained_run, tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "odd.png", pnginfo=png_info("x\nSteps: many, Sampler: ddim, Seed: 1"))
    assert_user_error(cli(capsys, "sample", trained_run, "--from", tmp_path / "odd.png"), "records Steps: 'many', which is not a whole number")
    cli(capsys, "sample", trained_run, "--n", 3, "--steps", 2, "--seed", 8, "--out", tmp_path / "made")
    code, _, err = cli(capsys, "sample", trained_run, "--from", tmp_path / "made" / "sample_00001.png", "--out", tmp_path / "again")
    assert code == 0, err
    assert np.abs(pixels(tmp_path / "again" / "sample_00001.png") - pixels(tmp_path / "made" / "sample_00001.png")).max() <= 1


def png_info(text: str):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    return info
