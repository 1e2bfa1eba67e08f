"""Cross-attention maps (DAAM): the probabilities the recorder computes are the layers' own, their aggregation,
the shipped model's maps of "red apple", that recording changes no image, and the bad inputs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_user_error, cli, tiny_config
from PIL import Image

from diffusekit.attention_maps import AttentionCollector
from diffusekit.errors import UserError
from diffusekit.models import build_net, default_model
from diffusekit.nn.attention_recorder import CrossAttentionRecorder, attention_probabilities, cross_attention_layers, recording
from diffusekit.nn.blocks import Attention, sliced_attention
from diffusekit.nn.dit import DiT
from diffusekit.nn.unet import UNet
from diffusekit.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
# "red apple" on the shipped model, 2 images, 6 steps, seed 0: the two words' maps correlate at about 0.05 here
# (8 images at the model's 20 steps: 0.05; benchmarks/attention_maps.py measures more prompts). Well apart:
RED_APPLE_MAX_CORRELATION = 0.5


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(1)
    return Pipeline.from_pretrained(default_model(), device="cpu")


def text_network(kind: str, width: int = 12) -> torch.nn.Module:
    """A tiny text-conditioned U-Net (cross-attention at 8 x 8 and 4 x 4) or DiT (over 4 x 4 patches)."""
    torch.manual_seed(0)
    if kind == "unet":
        return UNet(1, 1, channels=(8, 16), attention_levels=(0, 1), attention_head_dim=4, norm_groups=4, cross_attention_dim=width).eval()
    return DiT(in_channels=1, sample_size=8, patch_size=2, hidden_size=16, depth=2, num_heads=2, cross_attention_dim=width).eval()


def test_probabilities_are_softmax_rows_and_reproduce_the_layers_output():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])[:, None, None, :]
    probs = attention_probabilities(q, k, mask)
    assert probs.shape == (2, 3, 10, 5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 10))  # each query's probabilities over the keys sum to 1
    assert torch.all(probs[1, :, :, 3:] == 0)  # padding gets none
    torch.testing.assert_close(probs @ v, sliced_attention(q, k, v, mask, query_chunk=4096))  # what the fused kernel computed


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_the_recorder_sums_over_layers_heads_and_calls_and_keeps_the_conditional_rows(kind):
    net, context = text_network(kind), torch.randn(4, 6, 12)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[:, 4:] = 0
    layers = cross_attention_layers(net)
    assert layers and all(layer.cross for layer in layers)
    every = CrossAttentionRecorder((16, 16), positions=None, rows=2)  # all 6 keys, the first 2 of 4 rows
    with recording(net, every):
        for t in (10.0, 50.0):
            net(torch.randn(4, 1, 8, 8), torch.tensor([t]), context=context, context_mask=mask)
    assert every.total.shape == (2, 6, 16, 16)
    assert every.count == 2 * sum(layer.heads for layer in layers)  # two calls, each layer's heads
    # each query's probabilities sum to 1 over the keys, bicubic upsampling keeps a constant: the sum over keys is the count
    torch.testing.assert_close(every.total.sum(1), torch.full((2, 16, 16), float(every.count)))
    assert torch.all(every.total[:, 4:] == 0)  # padding keys: no attention
    assert all(layer.recorder is None for layer in net.modules() if isinstance(layer, Attention))  # the seam is back to off


def test_the_shipped_model_maps_red_and_apple_differently(shipped):
    out = shipped("red apple", n=2, steps=6, seed=0, return_attention=True)
    maps = out.attention
    assert maps.tokens == ["red", "apple"]
    assert maps.raw.shape == maps.maps.shape == (2, 2, 32, 32)
    assert torch.all(maps.raw >= 0) and torch.all(maps.raw.sum(1) < 1)  # the prompt's words: part of the attention ([CLS], [SEP] hold the rest)
    flat = maps.maps.flatten(2)
    torch.testing.assert_close(flat.amax(-1), torch.ones(2, 2))  # scaled for display: each map from 0 to 1
    torch.testing.assert_close(flat.amin(-1), torch.zeros(2, 2))
    assert maps.correlation(0, 1) < RED_APPLE_MAX_CORRELATION
    assert maps.correlation(0, 0) == pytest.approx(1.0)


def test_recording_changes_no_image_and_off_is_the_code_before_the_seam(shipped, monkeypatch):
    on = shipped("red apple", n=2, steps=3, seed=1, return_attention=True)
    off = shipped("red apple", n=2, steps=3, seed=1)
    assert off.attention is None and on.attention is not None
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(on, off))
    x_off = shipped.sample(2, prompts="red apple", steps=3, seed=1)
    spec = importlib.util.spec_from_file_location("attention_benchmark", ROOT / "benchmarks" / "attention_maps.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    monkeypatch.setattr(Attention, "attend", benchmark.attend_before_seam)
    assert torch.equal(shipped.sample(2, prompts="red apple", steps=3, seed=1), x_off)


def test_guidance_records_the_conditional_half_only(shipped):
    collector = AttentionCollector(shipped, "red apple")
    shipped.sample(3, prompts="red apple", steps=2, seed=0, guidance=3.0, batch_size=2, attention=collector)
    assert collector.result().raw.shape == (3, 2, 32, 32)  # 3 images in batches of 2 and 1, not the doubled guided batch
    alone = AttentionCollector(shipped, "red apple")
    shipped.sample(1, prompts="red apple", steps=2, seed=0, guidance=3.0, attention=alone)
    torch.testing.assert_close(alone.result().raw[0], collector.result().raw[0])  # image 0 does not depend on its batch


def test_words_pick_tokens_and_bad_inputs_say_what_is_available(shipped):
    assert shipped.text_encoder.prompt_tokens("red apple, shinyness") == [(1, "red"), (2, "apple"), (3, ","), (4, "shiny"), (5, "##ness")]
    assert [token for _, token in AttentionCollector(shipped, "red apple", ["apple"]).chosen] == ["apple"]
    assert [token for _, token in AttentionCollector(shipped, "red apple", ["1", "Red"]).chosen] == ["apple", "red"]
    for words, named in ((["pear"], "'pear' is not a token"), (["2"], "'2' is not a token")):
        with pytest.raises(UserError, match=named) as err:
            AttentionCollector(shipped, "red apple", words)
        assert "0 'red', 1 'apple'" in str(err.value)
    with pytest.raises(UserError, match="one prompt at a time, got 2 prompts"):
        AttentionCollector(shipped, ["red apple", "rocket"])
    with pytest.raises(UserError, match="got no prompt"):
        AttentionCollector(shipped, None)
    for config, kind in ((tiny_config(), "unconditional"), (tiny_config(model__num_classes=3), "class-conditional")):
        with pytest.raises(UserError, match=f"this model is {kind}: it has no cross-attention"):
            Pipeline(config, build_net(config))(n=1, return_attention=True)


def test_generate_draws_the_maps_and_refuses_bad_words(tmp_path, capsys):
    maps, grid = tmp_path / "maps.png", tmp_path / "apples.png"
    code, out, err = cli(capsys, "generate", "red apple", "--n", 2, "--steps", 2, "--out", grid, "--attention-maps", maps)
    assert code == 0, err
    assert "cross-attention maps of 'red', 'apple'" in out
    with Image.open(maps) as figure:
        assert figure.width > figure.height > 0  # 2 rows of 3 panels: the image, red, apple
    before = maps.read_bytes()
    assert_user_error(cli(capsys, "generate", "red apple", "--n", 1, "--out", tmp_path / "b.png", "--attention-maps", maps), "maps.png already exists")
    assert maps.read_bytes() == before
    assert_user_error(cli(capsys, "generate", "red apple", "--out", tmp_path / "c.png", "--attention-maps", tmp_path / "m.png",
                          "--attention-words", "red,pear"), "'pear' is not a token", "0 'red', 1 'apple'")
    assert_user_error(cli(capsys, "generate", "red apple", "--out", tmp_path / "d.png", "--attention-words", "red"), "--attention-maps")
    assert_user_error(cli(capsys, "generate", "red apple", "--out", tmp_path / "e.png", "--attention-maps", tmp_path / "maps.gif"), ".png")
    assert not (tmp_path / "c.png").exists() and not (tmp_path / "m.png").exists()
