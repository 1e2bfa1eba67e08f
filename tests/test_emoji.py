"""The `emoji` dataset: rendering from the Noto Color Emoji font, captions, the cache, a missing font."""

from __future__ import annotations

import os

import pytest
import torch

from diffusekit.data import emoji as emoji_data
from diffusekit.data.emoji import DEBIAN_FONT, FONT_ENV, caption, emoji_names, find_font, load_emoji, open_font, render_emoji
from diffusekit.errors import UserError

RED_APPLE, JAPAN = "\U0001f34e", "\U0001f1ef\U0001f1f5"
NO_GLYPH = "\U000f0000"  # private use: no emoji font draws it


@pytest.fixture
def font_path():
    path = os.environ.get(FONT_ENV) or DEBIAN_FONT
    if not os.path.isfile(path):
        pytest.skip(f"the Noto Color Emoji font is not installed at {path} (apt-get install fonts-noto-color-emoji)")
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSEKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def non_white_share(image: torch.Tensor) -> torch.Tensor:
    """Share of pixels that are not (almost) white, per image of a [N, 3, H, W] uint8 batch."""
    return (image < 250).any(dim=-3).float().mean(dim=(-2, -1))


def test_a_subset_renders_on_white_with_captions(font_path, cache):
    images, captions = load_emoji(32, font_path, limit=12, progress=False)
    assert images.dtype == torch.uint8 and images.shape == (12, 3, 32, 32)
    corners = images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 255).all()
    assert (non_white_share(images) > 0.05).all()  # every glyph drew something
    assert len(captions) == 12 and len(set(captions)) == 12
    assert all(text and text == text.lower() and ":" not in text.replace("flag: ", "") for text in captions)


def test_red_apple_is_named_and_renders_red(font_path):
    assert (RED_APPLE, "red apple") in emoji_names()
    image = torch.from_numpy(render_emoji(RED_APPLE, 32, open_font(find_font(font_path)))).float()
    drawn = image[:, (image < 250).any(dim=0)]  # [3, drawn pixels]
    red, green, blue = drawn.mean(dim=1)
    assert drawn.shape[1] > 0.3 * 32 * 32 and red > 1.5 * green and red > 1.5 * blue


def test_sequences_the_font_lacks_render_nothing(font_path):
    font = open_font(find_font(font_path))
    assert render_emoji(NO_GLYPH, 32, font) is None
    assert render_emoji(RED_APPLE + RED_APPLE, 32, font) is None  # two glyphs, not one emoji


def test_captions_are_cldr_short_names_without_skin_tones():
    assert caption(RED_APPLE, ":red_apple:") == "red apple"
    assert caption(JAPAN, ":Japan:") == "flag: japan"
    assert caption("\U0001f44c", ":OK_hand:") == "ok hand"
    skin_tones = {chr(c) for c in range(0x1F3FB, 0x1F400)}
    assert not any(set(sequence) & skin_tones for sequence, _ in emoji_names())


def test_second_load_reads_the_cache_without_rendering(font_path, cache, monkeypatch):
    first = load_emoji(16, font_path, limit=4, progress=False)
    assert len(list((cache / "emoji").glob("emoji-16px-4-*.safetensors"))) == 1
    assert len(list((cache / "emoji").glob("emoji-16px-4-*.json"))) == 1

    def must_not_render(*args, **kwargs):
        raise AssertionError("rendered again instead of reading the cache")

    monkeypatch.setattr(emoji_data, "render_emoji", must_not_render)
    images, captions = load_emoji(16, font_path, limit=4, progress=False)
    assert torch.equal(images, first[0]) and captions == first[1]


def test_missing_font_is_a_user_error_naming_the_package_and_the_option(tmp_path, cache):
    with pytest.raises(UserError, match=rf"nope\.ttf.*apt-get install fonts-noto-color-emoji.*{FONT_ENV}"):
        load_emoji(32, tmp_path / "nope.ttf")


def test_font_from_the_environment_variable(tmp_path, cache, monkeypatch):
    monkeypatch.setenv(FONT_ENV, str(tmp_path / "elsewhere.ttf"))
    with pytest.raises(UserError, match=r"elsewhere\.ttf"):
        load_emoji(32)


def test_a_file_that_is_not_a_font_is_a_user_error(tmp_path, cache):
    (tmp_path / "fake.ttf").write_bytes(b"not a font")
    with pytest.raises(UserError, match=r"cannot open .*fake\.ttf"):
        load_emoji(32, tmp_path / "fake.ttf")


def test_sizes_beyond_the_glyphs_are_a_user_error(cache):
    with pytest.raises(UserError, match=r"size 200 .* 1 to 136"):
        load_emoji(200)
