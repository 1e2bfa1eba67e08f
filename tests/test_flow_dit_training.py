"""Flow matching and the DiT through the trainer, the pipeline and the CLI: a tiny flow model learns,
DiTs of every kind train and sample (pixels, latents, classes, text), both resume bit-exactly, and
the bad inputs of issue 17 are one clear error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import assert_user_error, cli, random_images, tiny_config, write_images
from test_latent import TINY_VAE, vae_run  # noqa: F401 (a fixture)
from test_learning import on_both_modes, patterns
from test_text import TEXT_MODEL, two_caption_folder
from test_train_resume import assert_same_tensors, checkpoint_tensors

from diffusekit.diffusion_training import train
from diffusekit.errors import ConfigError, UserError
from diffusekit.io.checkpoint import latest_checkpoint
from diffusekit.models import build_net
from diffusekit.nn.dit import DiT
from diffusekit.pipeline import Pipeline

# a flow model keeps the default betas (tiny_config's are DDPM options, refused under flow)
FLOW = {"diffusion__process": "flow", "diffusion__prediction": "v", "diffusion__beta_start": 1e-4, "diffusion__beta_end": 0.02,
        "diffusion__timestep_sampling": "logit_normal", "sample__sampler": "flow_euler", "sample__spacing": "linspace"}
DIT = {"model__type": "dit", "model__hidden_size": 32, "model__depth": 2, "model__num_heads": 2, "model__patch_size": 2}


@pytest.fixture
def images(tmp_path):
    write_images(tmp_path / "images", random_images(16, seed=4))
    return str(tmp_path / "images")


# ----------------------------------------------------------------------------- flow matching learns


def test_a_tiny_flow_model_learns_two_patterns(tmp_path):
    """As tests/test_learning.py, with flow matching (v = eps - x0, logit-normal t): samples land on both modes."""
    modes = patterns()
    write_images(tmp_path / "images", [modes[0]] * 8 + [modes[1]] * 8)
    config = tiny_config(data__path=str(tmp_path / "images"), train__max_steps=200, train__batch_size=16, train__lr=3e-3,
                         train__ema_decay=0.99, train__log_every=10, sample__n=4, **FLOW)
    train(config, tmp_path / "run", progress=False)
    pipe = Pipeline.from_pretrained(tmp_path / "run", device="cpu")
    modes = torch.from_numpy(modes).float() / 127.5 - 1
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0]
    assert on_both_modes(pipe, modes)
    torch.manual_seed(0)
    assert not on_both_modes(Pipeline(pipe.config, build_net(pipe.config)), modes)


# ----------------------------------------------------------------------------- the DiT through the trainer


@pytest.mark.parametrize("process", ["ddpm", "flow"])
def test_a_dit_trains_and_samples_in_pixel_space(images, tmp_path, process):
    config = tiny_config(data__path=images, train__max_steps=2, **DIT, **(FLOW if process == "flow" else {}))
    train(config, tmp_path / "run", progress=False)
    pipe = Pipeline.from_pretrained(tmp_path / "run")
    assert isinstance(pipe.net, DiT) and pipe.net.patch_size == 2 and len(pipe.net.transformer_blocks) == 2
    assert pipe.sample(3, steps=3).shape == (3, 1, 8, 8)
    assert pipe.sample(2, steps=3, size=12).shape == (2, 1, 12, 12)  # sincos positions: another size


def test_info_names_the_dit_and_flow(images, tmp_path, capsys):
    train(tiny_config(data__path=images, train__max_steps=1, **DIT, **FLOW), tmp_path / "run", progress=False)
    code, out, _ = cli(capsys, "info", tmp_path / "run")
    assert code == 0 and "DiT" in out and "patch 2, width 32, depth 2" in out and "flow matching" in out and "logit_normal" in out


def test_a_class_conditional_dit(tmp_path):
    config = tiny_config(data__dataset="mnist", data__limit=40, train__max_steps=2, model__num_classes=10, **DIT)
    train(config, tmp_path / "run", progress=False)
    pipe = Pipeline.from_pretrained(tmp_path / "run")
    assert pipe.net.num_classes == 10
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 1.0])
    zeros, ones = (pipe.denoiser(x, sigma, {"class_labels": torch.full((2,), k)}) for k in (0, 1))
    assert not torch.allclose(zeros, ones, rtol=0, atol=1e-7)  # two optimizer steps moved the zero-initialised layers
    assert pipe.sample(2, steps=3, labels=[0, 1], guidance=3.0).shape == (2, 1, 8, 8)


def test_a_text_conditioned_dit(tmp_path):
    two_caption_folder(tmp_path / "images")
    text = {k: v for k, v in TEXT_MODEL.items() if k != "model__attention_levels"}
    config = tiny_config(data__path=str(tmp_path / "images"), train__max_steps=2, **text, **DIT, **FLOW)
    train(config, tmp_path / "run", progress=False)
    pipe = Pipeline.from_pretrained(tmp_path / "run")
    assert pipe.net.cross_attention_dim == 384
    left = pipe.sample(2, steps=3, prompts="white on the left", guidance=2.0, seed=0)
    right = pipe.sample(2, steps=3, prompts="white on the right", guidance=2.0, seed=0)
    assert left.shape == (2, 1, 8, 8) and not torch.allclose(left, right, rtol=0, atol=1e-7)


def test_a_latent_dit(vae_run, tmp_path):  # noqa: F811
    config = tiny_config(data__path=str(vae_run.parent / "images"), data__channels=3, latent__vae=str(vae_run), train__max_steps=2,
                         **{f"vae__{k}": v for k, v in TINY_VAE.items()}, **DIT, **FLOW)
    train(config, tmp_path / "ldm", progress=False)
    pipe = Pipeline.from_pretrained(tmp_path / "ldm")
    assert isinstance(pipe.net, DiT) and pipe.net.in_channels == 2 and pipe.net.sample_size == 4  # 8 px through a 2x VAE
    assert pipe.sample(2, steps=3).shape == (2, 3, 8, 8)


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("kind", ["flow", "dit", "dit-flow"])
def test_resume_is_bit_exact(images, tmp_path, kind):
    """As tests/test_train_resume.py: flow draws (logit-normal, shifted) and the DiT's dropout continue exactly."""
    sets = {**{"flow": {**FLOW, "diffusion__shift": 2.0}, "dit": DIT, "dit-flow": {**DIT, **FLOW}}[kind], "model__dropout": 0.1}
    straight = train(tiny_config(data__path=images, train__max_steps=6, **sets), tmp_path / "straight", progress=False)
    train(tiny_config(data__path=images, train__max_steps=3, **sets), tmp_path / "split", progress=False)
    resumed = train(tiny_config(data__path=images, train__max_steps=6, **sets), tmp_path / "split", resume=True, progress=False)
    assert resumed.step == straight.step == 6
    a, b = checkpoint_tensors(straight.checkpoint), checkpoint_tensors(resumed.checkpoint)
    for group in a:
        assert_same_tensors(a[group], b[group])
    losses = [[json.loads(line)["loss"] for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()] for r in (straight, resumed)]
    assert losses[0] == losses[1]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("sets, fragments", [
    ({"diffusion__zero_terminal_snr": True}, ["diffusion.zero_terminal_snr is a DDPM option", "zero_terminal_snr = false"]),
    ({"diffusion__schedule": "cosine"}, ["diffusion.schedule = 'cosine' is a DDPM beta-schedule option", "has no betas"]),
    ({"diffusion__beta_end": 0.012}, ["diffusion.beta_end = 0.012 is a DDPM", "the default 0.02"]),
    ({"diffusion__prediction": "eps"}, ["diffusion.prediction = 'eps' does not work for a flow model", "diffusion.prediction = \"v\""]),
    ({"diffusion__loss_weighting": "min_snr"}, ["diffusion.loss_weighting = 'min_snr' is a DDPM option", "timestep_sampling"]),
    ({"sample__spacing": "leading"}, ["sample.spacing = 'leading' does not apply to a flow model", "linspace"]),
])
def test_ddpm_only_options_under_flow_are_one_clear_error(images, sets, fragments):
    with pytest.raises(ConfigError) as err:
        tiny_config(data__path=images, **{**FLOW, **sets})
    for fragment in fragments:
        assert fragment in str(err.value)


def test_flow_only_options_under_ddpm_name_the_process(images):
    for key, value in (("diffusion__shift", 3.0), ("diffusion__timestep_sampling", "logit_normal")):
        with pytest.raises(ConfigError, match=f"diffusion.{key.split('__')[1]} = .* applies to flow models only: set diffusion.process"):
            tiny_config(data__path=images, **{key: value})


def test_a_patch_size_that_does_not_divide_the_image_or_latent_size(images):
    with pytest.raises(ConfigError, match=r"model.patch_size = 3 does not divide data.image_size = 8.*\(1, 2, 4, 8\)"):
        tiny_config(data__path=images, **{**DIT, "model__patch_size": 3})
    with pytest.raises(ConfigError, match=r"model.patch_size = 8 does not divide the latent size = 4"):
        tiny_config(data__path=images, data__channels=3, latent__vae="vae-run", **{f"vae__{k}": v for k, v in TINY_VAE.items()},
                    **{**DIT, "model__patch_size": 8})
    with pytest.raises(UserError, match=r"10x10 does not divide into this DiT's 4x4 patches"):
        build_net(tiny_config(data__path=images, **{**DIT, "model__patch_size": 4}))(torch.zeros(1, 1, 10, 10), torch.zeros(1))


def test_the_cli_prints_a_bad_flow_or_dit_setting_as_one_line(capsys, images, tmp_path):
    base = ["train", "--preset", "mnist", "--out", tmp_path / "run", "--set", "train.max_steps=1"]
    assert_user_error(cli(capsys, *base, "--set", "diffusion.process=flow"), "diffusion.loss_weighting = 'min_snr' is a DDPM option")
    assert_user_error(cli(capsys, *base, "--set", "model.type=dit", "--set", "model.patch_size=3"), "model.patch_size = 3 does not divide data.image_size = 28")
    assert not (tmp_path / "run").exists()


def test_a_dit_checkpoint_given_to_a_unet_config(images, tmp_path, capsys):
    train(tiny_config(data__path=images, train__max_steps=1, **DIT), tmp_path / "dit", progress=False)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(latest_checkpoint(tmp_path / "dit"), ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["model"]["type"] = "unet"
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"are a DiT's, but the config says model.type = 'unet'.*set model.type = 'dit'"):
        Pipeline.from_pretrained(ckpt)
    capsys.readouterr()
    assert_user_error(cli(capsys, "sample", ckpt, "--out", tmp_path / "x.png"), "set model.type = 'dit'")
    with pytest.raises(UserError, match=r"model.type: 'dit' in the run, 'unet' asked"):
        train(tiny_config(data__path=images, train__max_steps=2), tmp_path / "dit", resume=True, progress=False)
