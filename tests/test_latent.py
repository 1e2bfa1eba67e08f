"""Latent diffusion: autoencoder training, the latent scale, the latent cache, and a latent model end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import random_images, tiny_config, write_images

from diffusekit.autoencoder_training import latent_scale, train_vae
from diffusekit.cli import main as cli_main
from diffusekit.data import ImageDataset
from diffusekit.data import latents as latents_module
from diffusekit.data.latents import latent_dataset
from diffusekit.diffusion_training import train
from diffusekit.errors import UserError
from diffusekit.metrics import psnr, ssim
from diffusekit.nn.vae import AutoencoderKL
from diffusekit.pipeline import Pipeline

TINY_VAE = {"channels": [8, 16], "layers_per_block": 1, "latent_channels": 2, "norm_groups": 4}


def vae_config(folder: Path, **sets):
    sets = {f"vae__{k}": v for k, v in TINY_VAE.items()} | {"data__path": str(folder), "data__channels": 3, "task": "autoencoder"} | sets
    return tiny_config(**sets)


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory) -> Path:
    """A tiny autoencoder trained 12 steps, with the patch discriminator switched on at step 6."""
    root = tmp_path_factory.mktemp("vae")
    write_images(root / "images", random_images(16, channels=3, seed=3))
    config = vae_config(root / "images", train__max_steps=12, vae_loss__disc_weight=0.5, vae_loss__disc_start=6,
                        vae_loss__disc_channels=8, vae_loss__disc_layers=1, eval__n=16)
    train_vae(config, root / "vae", progress=False)
    return root / "vae"


def test_autoencoder_run_logs_discriminator_losses_after_it_starts(vae_run):
    records = [json.loads(line) for line in (vae_run / "metrics.jsonl").read_text().splitlines()]
    assert all("d_loss" not in r for r in records if r["step"] <= 6)
    assert all("d_loss" in r and "adaptive_weight" in r for r in records if r["step"] > 6)
    assert (vae_run / "samples" / "step_00000012.png").is_file()
    assert (vae_run / "checkpoints" / "step_00000012" / "discriminator.safetensors").is_file()


def test_checkpoint_records_the_latent_scale_of_the_data(vae_run):
    config = json.loads((vae_run / "checkpoints" / "step_00000012" / "config.json").read_text())
    scale = config["vae"]["scale_factor"]
    vae = AutoencoderKL(3, (8, 16), 1, 2, 4)
    from diffusekit.files import read_tensors

    vae.load_state_dict(read_tensors(vae_run / "checkpoints" / "step_00000012" / "ema.safetensors"))
    from diffusekit.data import load_dataset
    from diffusekit.io.checkpoint import load_config

    images = load_dataset(load_config(vae_run / "checkpoints" / "step_00000012").data).images
    assert scale == pytest.approx(latent_scale(vae, images, "cpu"), rel=1e-5)
    assert scale != 1.0


def test_latent_scale_makes_latents_unit_std():
    torch.manual_seed(0)
    vae = AutoencoderKL(3, (8, 16), 1, 2, 4)
    images = torch.from_numpy(random_images(64, channels=3)).permute(0, 3, 1, 2).contiguous()
    vae.scale_factor = latent_scale(vae, images, "cpu")
    mean, std = latents_module.encode_images(vae, images, "cpu", progress=False)
    z = latents_module.LatentDataset(mean, std).sample(torch.arange(64), torch.Generator().manual_seed(1))
    assert z.std().item() == pytest.approx(1.0, abs=0.05)  # scaled samples z ~ q(z|x) have unit std


def test_latent_cache_is_reused_and_rebuilt_when_the_data_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSEKIT_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    vae = AutoencoderKL(3, (8, 16), 1, 2, 4).eval()
    images = torch.from_numpy(random_images(10, channels=3)).permute(0, 3, 1, 2).contiguous()
    calls = []
    real_encode = latents_module.encode_images
    monkeypatch.setattr(latents_module, "encode_images", lambda *a, **k: calls.append(1) or real_encode(*a, **k))

    first = latent_dataset(ImageDataset(images), vae, "tiny", "cpu", progress=False)
    again = latent_dataset(ImageDataset(images), vae, "tiny", "cpu", progress=False)
    assert len(calls) == 1 and torch.equal(first.mean, again.mean)
    assert first.mean.shape == (10, 2, 4, 4)

    changed = images.clone()
    changed[0, 0, 0, 0] ^= 1  # one pixel of one image
    rebuilt = latent_dataset(ImageDataset(changed), vae, "tiny", "cpu", progress=False)
    assert len(calls) == 2 and not torch.equal(rebuilt.mean[0], first.mean[0]) and torch.equal(rebuilt.mean[1:], first.mean[1:])

    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(1.0)  # a retrained VAE is another VAE, even where the encoder did not change
    latent_dataset(ImageDataset(changed), vae, "tiny", "cpu", progress=False)
    assert len(calls) == 3


def test_latent_model_end_to_end(vae_run, tmp_path, capsys):
    images_folder = vae_run.parent / "images"
    config = tiny_config(data__path=str(images_folder), data__channels=3, latent__vae=str(vae_run), train__max_steps=3,
                         model__channels=[8, 16], **{f"vae__{k}": v for k, v in TINY_VAE.items()})
    result = train(config, tmp_path / "ldm", progress=False)
    ckpt_files = {p.name for p in result.checkpoint.iterdir()}
    assert "vae.safetensors" in ckpt_files
    pipe = Pipeline.from_pretrained(tmp_path / "ldm")
    assert pipe.vae is not None and pipe.net.conv_in.in_channels == 2
    images = pipe.sample(3, steps=4, sampler="ddim")
    assert images.shape == (3, 3, 8, 8) and images.abs().max() <= 1
    assert cli_main(["sample", str(tmp_path / "ldm"), "--n", "2", "--steps", "3", "--out", str(tmp_path / "g.png"), "--animate", str(tmp_path / "a.gif")]) == 0
    assert cli_main(["info", str(tmp_path / "ldm")]) == 0
    assert "latent" in capsys.readouterr().out


def test_sampling_from_an_autoencoder_run_is_a_clear_error(vae_run):
    with pytest.raises(UserError, match="autoencoder"):
        Pipeline.from_pretrained(vae_run)


def test_latent_model_needs_an_autoencoder_run(trained_run, tmp_path):
    write_images(tmp_path / "images", random_images(4, channels=3))
    config = tiny_config(data__path=str(tmp_path / "images"), data__channels=3, latent__vae=str(trained_run),
                         **{f"vae__{k}": v for k, v in TINY_VAE.items()})
    with pytest.raises(UserError, match="not an autoencoder run"):
        train(config, tmp_path / "ldm", progress=False)


def test_psnr_and_ssim_against_closed_forms():
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    noisy = x + 0.1
    assert psnr(noisy, x) == pytest.approx(torch.full((4,), 10 * torch.log10(torch.tensor(4 / 0.01))), rel=1e-4)
    assert torch.allclose(ssim(x, x), torch.ones(4), atol=1e-6)
    blurred = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    assert (ssim(blurred, x) < 0.9).all() and torch.allclose(ssim(blurred, x), ssim(x, blurred), atol=1e-6)


def test_discriminator_step_uses_only_its_own_loss(tmp_path):
    from diffusekit.autoencoder_training import AutoencoderRecipe
    from diffusekit.nn.discriminator import hinge_d_loss
    from diffusekit.trainer import Trainer

    write_images(tmp_path / "images", random_images(8, channels=3, seed=5))
    config = vae_config(tmp_path / "images", vae_loss__disc_weight=0.5, vae_loss__disc_start=0, vae_loss__disc_channels=8,
                        vae_loss__disc_layers=1, train__grad_clip=0.0)
    trainer = Trainer(config, tmp_path / "run", AutoencoderRecipe, progress=False)
    disc, inputs, seen = trainer.recipe.disc, [], {}
    forward = disc.forward
    disc.forward = lambda x: inputs.append(x.detach().clone()) or forward(x)
    step = trainer.optimizers["disc_optimizer"].step

    def capture(*args, **kwargs):  # the gradients the discriminator's optimizer is about to use
        seen["grads"] = [p.grad.clone() for p in disc.parameters()]
        real, fake = inputs[-2], inputs[-1]
        seen["expected"] = torch.autograd.grad(hinge_d_loss(forward(real), forward(fake)), list(disc.parameters()))
        return step(*args, **kwargs)

    trainer.optimizers["disc_optimizer"].step = capture
    trainer.train_step()
    for got, want in zip(seen["grads"], seen["expected"]):
        assert torch.allclose(got, want, atol=1e-6)


def test_a_latent_run_resumes_with_its_own_autoencoder_after_the_vae_run_is_gone(vae_run, tmp_path):
    import shutil

    vae_copy = tmp_path / "vae"
    shutil.copytree(vae_run, vae_copy)
    images_folder = vae_run.parent / "images"
    settings = dict(data__path=str(images_folder), data__channels=3, latent__vae=str(vae_copy), model__channels=[8, 16],
                    **{f"vae__{k}": v for k, v in TINY_VAE.items()})
    train(tiny_config(train__max_steps=2, **settings), tmp_path / "ldm", progress=False)
    shutil.rmtree(vae_copy)  # moved or deleted: the run's checkpoint holds the autoencoder it was trained with
    result = train(tiny_config(train__max_steps=4, **settings), tmp_path / "ldm", resume=True, progress=False)
    assert result.step == 4


def test_prompts_must_share_the_images_evenly(tmp_path):
    two_captions = tmp_path / "images"
    from test_text import TEXT_MODEL, two_caption_folder

    two_caption_folder(two_captions)
    train(tiny_config(data__path=str(two_captions), train__max_steps=1, **TEXT_MODEL), tmp_path / "run", progress=False)
    pipe = Pipeline.from_pretrained(tmp_path / "run")
    assert pipe.sample(4, steps=2, prompts=["white on the left", "white on the right"]).shape[0] == 4
    with pytest.raises(UserError, match="cannot share 3 images evenly"):
        pipe.sample(3, steps=2, prompts=["white on the left", "white on the right"])
