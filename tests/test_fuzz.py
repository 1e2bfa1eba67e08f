"""Property-based tests: for any input a user can type or drop into a folder, diffusekit either works
or raises a UserError with a message; never any other exception (which the CLI would show as a traceback)."""

from __future__ import annotations

import io
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from diffusekit.config import Config, all_keys, apply_overrides
from diffusekit.data.folder import load_folder
from diffusekit.errors import UserError
from diffusekit.nn.unet import UNet
from diffusekit.pipeline import Pipeline

pytestmark = pytest.mark.filterwarnings("ignore::diffusekit.errors.DiffusekitWarning")  # skipped files warn, as they should
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def works_or_user_error(fn, *args, **kwargs):
    try:
        result = fn(*args, **kwargs)
    except UserError as err:
        assert str(err), "a UserError must say what is wrong"
        event("a UserError")
        return None
    event("works")  # both outcomes must be common (see pytest --hypothesis-show-statistics)
    return result


# ----------------------------------------------------------------------------- --set key=value

KEYS = st.one_of(st.sampled_from(all_keys()), st.sampled_from(all_keys()), st.text(string.ascii_letters + "._-", max_size=20))
VALUES = st.one_of(
    st.text(max_size=30),
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "[1, 2]", "[[1]]", "{a = 1}", "1979-05-27", "'x'", '"', "[", "1,2,,3", "nan", "-inf", "0x10", "1e400"]),
    st.sampled_from(["1", "2", "8", "64", "0.5", "1e-4", "0", "16,32", "ddim", "karras", '"10m"', "cosine", "v"]),  # often valid
)
ASSIGNMENTS = st.one_of(st.builds(lambda k, v: f"{k}={v}", KEYS, VALUES), st.text(max_size=40))


@settings(FAST, max_examples=300)
@given(st.lists(ASSIGNMENTS, min_size=1, max_size=2))
def test_any_set_assignments_work_or_are_a_user_error(assignments):
    config = works_or_user_error(apply_overrides, Config(), assignments)
    assert config is None or isinstance(config, Config)


# ----------------------------------------------------------------------------- prompt lists


class FakeTextEncoder(torch.nn.Module):
    """TextEncoder's interface over bytes: any string becomes token embeddings, as a tokenizer would."""

    dim, max_length = 8, 6

    def encode(self, prompts):
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            data = list(prompt.encode("utf-8"))[: self.max_length]
            ids[row, : len(data)], mask[row, : len(data)] = torch.tensor(data, dtype=torch.long), 1
        return torch.nn.functional.one_hot(ids % self.dim, self.dim).float(), mask


@pytest.fixture(scope="module")
def text_pipeline():
    config = tiny_config(text__encoder="minilm", model__cross_attention_dim=FakeTextEncoder.dim, model__attention_levels=[1])
    torch.manual_seed(0)
    return Pipeline(config, UNet.from_config(config.model, in_channels=1), text_encoder=FakeTextEncoder())


PROMPT = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "a red apple", "\x00", "🍎" * 50, "word " * 100]))
PROMPTS = st.one_of(PROMPT, st.lists(PROMPT, max_size=5), st.lists(st.one_of(PROMPT, st.integers(), st.none()), max_size=3))


@FAST
@given(prompts=PROMPTS, negative=st.one_of(st.none(), PROMPT), n=st.integers(min_value=-1, max_value=6), guidance=st.sampled_from([None, 1.0, 3.0, -1.0]))
def test_any_prompt_list_works_or_is_a_user_error(text_pipeline, prompts, negative, n, guidance):
    images = works_or_user_error(text_pipeline.sample, n, steps=1, prompts=prompts, negative=negative, guidance=guidance)
    assert images is None or (images.shape == (n, 1, 8, 8) and torch.isfinite(images).all())


# ----------------------------------------------------------------------------- image folders

MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "I;16", "I", "CMYK", "YCbCr", "F"]
SUFFIXES = [".png", ".jpg", ".jpeg", ".webp", ".PNG"]


@st.composite
def image_file(draw) -> tuple[str, bytes]:
    """(a file name with an image suffix, its bytes): a real image of any mode and size, random bytes, or a cut-off image."""
    suffix = draw(st.sampled_from(SUFFIXES))
    kind = draw(st.sampled_from(["image", "image", "bytes", "truncated", "empty"]))
    if kind == "bytes":
        return suffix, draw(st.binary(max_size=200))
    if kind == "empty":
        return suffix, b""
    mode, width, height = draw(st.sampled_from(MODES)), draw(st.integers(1, 40)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(mode) if mode not in ("I;16", "I", "F", "PA") else Image.fromarray(pixels[..., 0]).convert(mode)
    buffer = io.BytesIO()
    try:
        image.save(buffer, format={".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(suffix.lower(), "PNG"))
    except (OSError, ValueError, KeyError):  # a mode this format cannot store: the file is then just bytes
        return suffix, pixels.tobytes()[:100]
    data = buffer.getvalue()
    return suffix, data[: len(data) // 2] if kind == "truncated" else data


@FAST
@given(files=st.lists(image_file(), min_size=1, max_size=5), size=st.sampled_from([4, 8, 13]), channels=st.sampled_from([1, 3]),
       bad_images=st.sampled_from(["skip", "abort"]))
def test_any_image_folder_works_or_is_a_user_error(tmp_path_factory, files, size, channels, bad_images):
    folder = Path(tmp_path_factory.mktemp("fuzz"))
    for i, (suffix, data) in enumerate(files):
        (folder / f"file_{i}{suffix}").write_bytes(data)
    result = works_or_user_error(load_folder, folder, size, channels, bad_images=bad_images, progress=False)
    if result is not None:
        images, names, skipped = result
        assert images.shape == (len(names), channels, size, size) and images.dtype == torch.uint8
        assert len(names) + skipped == len(files)


# ----------------------------------------------------------------------------- the parameters text of a PNG given to --from

FIELDS = ["Steps", "Sampler", "Schedule type", "CFG scale", "Guidance rescale", "Eta", "Seed", "Image index", "Denoising strength",
          "Mask blur", "Jump length", "Jump samples", "Precision", "Size", "Label", "Model hash", "Model"]
FIELD_VALUES = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8", blacklist_characters=",\n\r\x00"), max_size=12),
    st.integers(min_value=-2**70, max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.builds(lambda a, b: f"{a}x{b}", st.integers(-10, 10**6), st.integers(-10, 10**6)),
    st.sampled_from(["8x8", "16x16", "4096x4096", "abcx32", "-32x-32", "1e400", "nan", "ddim", "euler", "karras", "trailing", "auto", "fp32",
                     "2", "0.5", "1", "0", '"quoted, value"', "1" * 5000]),
)
PARAMETER_LINES = st.one_of(
    st.text(max_size=80).filter(lambda t: "\x00" not in t),
    st.builds(lambda prompt, fields: "\n".join([prompt, ", ".join(f"{k}: {v}" for k, v in fields)]),
              st.text(alphabet=st.characters(codec="utf-8", blacklist_characters="\x00"), max_size=20),
              st.lists(st.tuples(st.one_of(st.sampled_from(FIELDS), st.text(string.ascii_letters + " ", min_size=1, max_size=10)), FIELD_VALUES),
                       min_size=3, max_size=8)),
)


@settings(FAST, max_examples=300)
@given(text=PARAMETER_LINES, command=st.sampled_from(["generate", "edit"]))
def test_any_parameters_text_given_to_from_works_or_is_a_user_error(text_pipeline, tmp_path_factory, text, command):
    """--from reads the PNG's parameters and checks every value against the model (size, sampler, steps, ...)
    before anything is allocated: the parse and the checks, without the sampling."""
    from PIL import PngImagePlugin

    from diffusekit.cli import build_parser
    from diffusekit.cli.sampling import check_arguments, check_image_outputs, read_from

    folder = Path(tmp_path_factory.mktemp("from"))
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("L", (2, 2)).save(folder / "made.png", pnginfo=info)
    words = [command, *(["init.png"] if command == "edit" else []), "--from", str(folder / "made.png"), "--out", str(folder / "out")]
    args = build_parser().parse_args(words)

    def parse_and_check():
        read_from(args)
        check_image_outputs(args)
        check_arguments(args, text_pipeline)

    works_or_user_error(parse_and_check)
