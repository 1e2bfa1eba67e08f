"""Images handed to diffusekit (an init image or a mask: `edit`, the server's uploads) are bounded by their
pixel count, each side and the aspect ratio, checked from the header before any pixel is decoded, and
resized from their centre square: a 2 kB PNG of 1 x 4,194,304 pixels is one clear error, not gigabytes."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_user_error, cli
from PIL import Image
from test_bad_inputs import png_header_only

from diffusekit.data.folder import MAX_INPUT_ASPECT, MAX_INPUT_SIDE
from diffusekit.errors import UserError
from diffusekit.images import image_tensor, open_image


@pytest.mark.parametrize("width, height, fragment", [
    (1, 4_194_304, f"longer than the {MAX_INPUT_SIDE} allowed"),
    (1, 1_000_000, f"longer than the {MAX_INPUT_SIDE} allowed"),
    (8200, 1100, f"longer than the {MAX_INPUT_SIDE} allowed"),
    (100, 900, f"more than {MAX_INPUT_ASPECT} times the other"),
    (5000, 5000, "more than the 16777216 allowed"),
])
def test_a_huge_or_thin_image_is_refused_from_its_header(tmp_path, width, height, fragment):
    path = png_header_only(tmp_path / "claims.png", width, height)  # its pixel data is cut short: decoding it would fail otherwise
    with pytest.raises(UserError, match=f"the init image is {width}x{height} pixels") as refused:
        open_image(path, "init image")
    assert fragment in str(refused.value)


def test_an_image_at_the_aspect_limit_is_its_centre_square():
    wide = np.zeros((8, 8 * MAX_INPUT_ASPECT), np.uint8)
    wide[:, 28:36] = 255  # the centre square is white, the rest black
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, format="PNG")
    tensor = image_tensor(open_image(buffer.getvalue()), 8, 1)
    assert tensor.shape == (1, 1, 8, 8) and bool((tensor == 1).all())


def test_resizing_takes_the_centre_square_first_without_a_large_intermediate():
    """An accepted 8:1 RGB image to a large size: the old resize-then-crop made an image 8 times the output."""
    script = """
import resource
from PIL import Image
from diffusekit.images import image_tensor
image = Image.new("RGB", (1024, 8192), (10, 20, 30))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tensor = image_tensor(image, 2048, 3)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) < 170, out.stdout  # MiB: about 120 (the converted input and the output's arrays); 225 with a 2048 x 16384 intermediate


def thin_png(path, width: int = 1, height: int = 4_194_304):
    Image.new("L", (width, height)).save(path)
    return path


def test_edit_refuses_a_thin_init_image_or_mask_in_one_line(capsys, trained_run, tmp_path):
    thin = thin_png(tmp_path / "thin.png")
    assert thin.stat().st_size < 10_000  # a few kB on disk
    assert_user_error(cli(capsys, "edit", thin, "--model", trained_run, "--out", tmp_path / "out.png"),
                      "the init image is 1x4194304 pixels", f"longer than the {MAX_INPUT_SIDE} allowed")
    Image.new("L", (8, 8)).save(tmp_path / "init.png")
    assert_user_error(cli(capsys, "edit", tmp_path / "init.png", "--mask", thin, "--model", trained_run, "--out", tmp_path / "out.png"),
                      "the mask is 1x4194304 pixels")
    assert not (tmp_path / "out.png").exists()


def test_a_thin_image_in_a_training_folder_is_skipped_and_counted_without_decoding_it(image_folder):
    """The same bound reads training folders (with PIL's own pixel limit, so large photos still train)."""
    import warnings

    from diffusekit.data.folder import load_folder
    from diffusekit.errors import DiffusekitWarning

    thin_png(image_folder / "thin.png", 1, 1_000_000)
    Image.new("L", (600, 500), 255).save(image_folder / "photo.png")  # an ordinary non-square photo trains, its centre square
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", DiffusekitWarning)
        images, names, skipped = load_folder(image_folder, 8, 1, bad_images="skip", progress=False)
    assert skipped == 1 and "thin.png" not in names and "photo.png" in names
    assert any("thin.png" in str(w.message) and "more than 8 times the other" in str(w.message) for w in seen)
    assert (images[names.index("photo.png")] == 255).all()
