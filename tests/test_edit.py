"""Image-to-image (SDEdit) and inpainting: where they start, what they keep, and what they refuse."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from diffusekit.errors import UserError
from diffusekit.inpaint import KnownRegionDenoiser, sample_resampled, strength_start
from diffusekit.models import ModelParts, build_net
from diffusekit.pipeline import Pipeline
from diffusekit.samplers import SAMPLERS
from diffusekit.seeds import sample_generators


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    torch.manual_seed(0)
    config = tiny_config()
    return Pipeline.from_parts(ModelParts(config, build_net(config)), "cpu")


def init_image(n: int = 1, seed: int = 5) -> torch.Tensor:
    return torch.rand((n, 1, 8, 8), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def half_mask() -> torch.Tensor:
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, 4:] = 1  # repaint the right half
    return mask


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m_sde", "heun"])
def test_strength_one_equals_text_to_image_from_the_same_noise(pipe, sampler):
    plain = pipe.sample(3, steps=6, sampler=sampler, seed=11)
    edited = pipe.sample(3, steps=6, sampler=sampler, seed=11, image=init_image(), strength=1.0)
    assert torch.equal(plain, edited)


def test_strength_near_zero_returns_the_init_image(pipe):
    init = init_image(2)
    kept = pipe.sample(2, steps=100, seed=1, image=init, strength=0.01)  # one step, from the least noisy level (sigma 0.03)
    changed = pipe.sample(2, steps=100, seed=1, image=init, strength=1.0)
    assert (kept - init).abs().mean() < 0.05
    assert (changed - init).abs().mean() > 0.3


def test_the_start_is_the_closed_form_forward_process_at_diffusers_img2img_timestep(pipe):
    """The first network call sees x_t = sqrt(abar) x0 + sqrt(1 - abar) eps (diffusers' add_noise) at the
    timestep diffusers' img2img picks, timesteps[steps - int(steps * strength)]."""
    diffusers = pytest.importorskip("diffusers")
    steps, strength, init = 10, 0.45, init_image()
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=100, beta_start=1e-3, beta_end=0.2, timestep_spacing="trailing", clip_sample=False,
                                        set_alpha_to_one=False)
    scheduler.set_timesteps(steps)
    t_start = steps - int(steps * strength)
    eps = torch.randn((1, 1, 8, 8), generator=sample_generators(3, 1)[0])
    expected = scheduler.add_noise(init, eps, scheduler.timesteps[t_start : t_start + 1])
    calls = []
    net = pipe.denoiser.net

    def recording(x_t, t, **cond):
        calls.append((x_t.clone(), t.clone()))
        return net(x_t, t, **cond)

    pipe.denoiser.net = recording
    try:
        pipe.sample(1, steps=steps, sampler="ddim", seed=3, image=init, strength=strength)
    finally:
        pipe.denoiser.net = net
    assert len(calls) == int(steps * strength)
    assert calls[0][1].item() == pytest.approx(scheduler.timesteps[t_start].item(), abs=1e-6)
    torch.testing.assert_close(calls[0][0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_pixels_outside_the_mask_stay_equal_to_the_init_image(pipe, sampler):
    init, mask = init_image(), half_mask()
    out = pipe.sample(2, steps=6, sampler=sampler, seed=4, image=init, mask=mask)
    torch.testing.assert_close(out[..., :, :4], init[..., :, :4].expand(2, -1, -1, -1), atol=1e-5, rtol=0)
    assert (out[..., :, 4:] - init[..., :, 4:]).abs().mean() > 0.1  # the masked half really was repainted


def test_resampling_jumps_keep_the_known_region_and_walk_every_chunk_again(pipe):
    init, mask = init_image(), half_mask()
    steps_seen = []
    out = pipe.sample(1, steps=6, sampler="ddpm", seed=2, image=init, mask=mask, jump_length=2, jump_n_sample=3,
                      callback=lambda info: steps_seen.append(info["i"]))
    torch.testing.assert_close(out[..., :, :4], init[..., :, :4], atol=1e-5, rtol=0)
    assert steps_seen == [0, 1] * 3 + [2, 3] * 3 + [4, 5] * 3


def test_the_known_region_is_the_init_image_noised_to_each_level():
    """DDIM keeps the known region on one noise path, x0 + sigma_next * eps0; DDPM redraws it each step
    with variance sigma_next^2 (a sample of q(x_sigma | x0), as RePaint's)."""
    known = torch.zeros(64, 1, 16, 16) + 0.3
    mask = torch.zeros(1, 1, 16, 16)
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    eps0 = torch.randn(known.shape, generator=torch.Generator().manual_seed(0))
    denoiser = KnownRegionDenoiser(lambda x, sigma, cond=None: torch.zeros_like(x), known, mask)
    for name in ("ddim", "ddpm"):
        residuals = []

        def look(info):
            if info["sigma_next"] > 0:
                residuals.append(((info["x"] - known) / info["sigma_next"].float()))

        gens = sample_generators(1, 64)
        out = sample_resampled(SAMPLERS[name], denoiser, known + 8.0 * eps0, sigmas, generator=gens, callback=look)
        torch.testing.assert_close(out, known)
        for r in residuals:
            if name == "ddim":
                torch.testing.assert_close(r, eps0, atol=1e-5, rtol=1e-5)
            else:
                assert r.std().item() == pytest.approx(1.0, abs=0.05) and abs(r.mean().item()) < 0.05


def test_edit_mistakes_are_user_errors(pipe):
    init = init_image()
    with pytest.raises(UserError, match="strength must be in"):
        pipe.sample(1, steps=4, image=init, strength=1.5)
    with pytest.raises(UserError, match="leaves no step"):
        pipe.sample(1, steps=4, image=init, strength=0.1)
    with pytest.raises(UserError, match="need an init image"):
        pipe.sample(1, steps=4, mask=half_mask())
    with pytest.raises(UserError, match="the init image is"):
        pipe.sample(1, steps=4, image=torch.zeros(1, 3, 8, 8))
    with pytest.raises(UserError, match="the mask is"):
        pipe.sample(1, steps=4, image=init, mask=torch.zeros(1, 1, 4, 4))
    assert strength_start(20, 0.6) == 8 and strength_start(20, 1.0) == 0


def test_pipeline_call_takes_pictures_and_returns_an_output_that_is_still_a_list(pipe):
    from PIL import Image

    picture = Image.new("L", (16, 12), 200)  # cropped and resized to 8 x 8
    mask = Image.new("L", (16, 12), 0)
    mask.paste(255, (8, 0, 16, 12))
    out = pipe(n=2, steps=4, seed=0, image=picture, mask_image=mask, mask_blur=0.5)
    assert isinstance(out, list) and len(out) == 2 and out.images == list(out)
    assert all(isinstance(image, Image.Image) and image.size == (8, 8) for image in out)
    assert out.images[0].info["parameters"] == out.parameters[0]
    assert "Denoising strength: 1.0" in out.parameters[0] and "Mask blur: 0.5" in out.parameters[0]
    first, *_ = pipe(n=1, steps=4)  # unpacks like the list it always was
    with pytest.raises(UserError, match="the mask is 4x4 pixels but the image is 16x12"):
        pipe(n=1, steps=4, image=picture, mask_image=Image.new("L", (4, 4)))


def test_image_i_of_a_seed_can_be_made_alone(pipe):
    batch = pipe.sample(4, steps=4, seed=9, sampler="ddpm")
    alone = pipe.sample(1, steps=4, seed=9, sampler="ddpm", first_index=2)
    torch.testing.assert_close(alone[0], batch[2], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- a latent model: the shipped one


@pytest.fixture(scope="module")
def shipped():
    from diffusekit.models import default_model

    pipe = Pipeline.from_pretrained(default_model(), device="cpu")
    init = pipe.sample(1, prompts="red apple", steps=8, seed=0)
    return pipe, init


def test_latent_inpainting_keeps_the_unmasked_pixels_within_the_vae_reconstruction_error(shipped):
    pipe, init = shipped
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :, 16:] = 1
    out = pipe.sample(2, prompts="rocket", steps=8, seed=2, image=init, mask=mask)
    reconstruction_error = (pipe.decode(pipe.encode(init)) - init).abs().mean()
    away = out[..., :, :12]  # one latent cell (4 px) away from the mask: the decoder's reach
    assert (away - init[..., :, :12]).abs().mean() <= 2 * reconstruction_error
    assert (out[..., :, 16:] - init[..., :, 16:]).abs().mean() > 5 * reconstruction_error


def test_latent_image_to_image_keeps_the_init_image_at_low_strength_and_follows_the_prompt_at_high(shipped):
    pipe, init = shipped
    reconstruction = pipe.decode(pipe.encode(init))
    near = pipe.sample(1, prompts="rocket", steps=20, seed=1, image=init, strength=0.05)  # the apple stays
    far = pipe.sample(1, prompts="rocket", steps=20, seed=1, image=init, strength=0.9)  # a rocket
    assert (near - reconstruction).abs().mean() < 0.2  # one step from sigma 0.17, under guidance towards "rocket"
    assert (far - init).abs().mean() > 3 * (near - init).abs().mean()
