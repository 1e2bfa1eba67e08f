"""A tiny U-Net really learns: two 8x8 patterns, a few hundred steps, then samples land on them.

The model predicts x0 (the tiny net learns that within seconds; eps prediction needs several
times more steps at this size). The same check must fail for an untrained model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config, write_images

from diffusekit.diffusion_training import train
from diffusekit.nn.unet import UNet
from diffusekit.pipeline import Pipeline


def patterns() -> np.ndarray:
    """Two modes: the left half lit, or the top half lit."""
    left, top = np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)
    left[:, :4] = 255
    top[:4, :] = 255
    return np.stack([left, top])


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    modes = patterns()
    write_images(root / "images", [modes[0]] * 8 + [modes[1]] * 8)
    config = tiny_config(data__path=str(root / "images"), diffusion__prediction="x0", train__max_steps=200, train__batch_size=16,
                         train__lr=3e-3, train__ema_decay=0.99, train__log_every=10, sample__n=4)
    train(config, root / "run", progress=False)
    return root / "run", torch.from_numpy(modes).float() / 127.5 - 1


def nearest_mode(samples: torch.Tensor, modes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(MSE to the nearest mode, index of that mode) for each sample."""
    mse = (samples[:, None, 0] - modes[None]).pow(2).flatten(2).mean(2)
    return mse.min(1)


def on_both_modes(pipe: Pipeline, modes: torch.Tensor) -> bool:
    """32 DDIM samples: every one within MSE 0.05 of a mode (on [-1, 1]), each mode at least 8 times."""
    mse, which = nearest_mode(pipe.sample(32, steps=20, sampler="ddim", seed=0), modes)
    return bool((mse < 0.05).all()) and torch.bincount(which, minlength=2).min().item() >= 8


def test_loss_falls(learned):
    run, _ = learned
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 20 and np.mean(losses[-3:]) < 0.7 * losses[0]


def test_samples_land_on_both_modes(learned):
    run, modes = learned
    assert on_both_modes(Pipeline.from_pretrained(run, device="cpu"), modes)


def test_an_untrained_model_does_not(learned):
    run, modes = learned
    config = Pipeline.from_pretrained(run, device="cpu").config
    torch.manual_seed(0)
    assert not on_both_modes(Pipeline(config, UNet.from_config(config.model, in_channels=1)), modes)
