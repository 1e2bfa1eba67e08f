"""Stable Diffusion / diffusers folders in and out, checked against diffusers itself.

Tiny random diffusers models (UNet2DModel, UNet2DConditionModel, AutoencoderKL, a CLIPTextModel
with a tokenizer built from a vocabulary written here) are perturbed off their initialisation,
saved with save_pretrained, loaded by diffusekit and compared on the same inputs; sampling is
compared end to end with diffusers' own pipelines from the same initial latents.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from conftest import PROMPT, initial_latents, max_diff, perturb, run_diffusers, sd_scheduler, tiny_config  # noqa: E402

from diffusekit.cli import main as cli_main  # noqa: E402
from diffusekit.config import config_to_dict, validate  # noqa: E402
from diffusekit.errors import ConfigError, UserError  # noqa: E402
from diffusekit.io.checkpoint import save_checkpoint  # noqa: E402
from diffusekit.io.diffusers import is_diffusers_folder, unet_config  # noqa: E402
from diffusekit.io.diffusers_export import export_diffusers  # noqa: E402
from diffusekit.models import build_net, build_vae  # noqa: E402
from diffusekit.nn.blocks import Attention, SelfAttention2D  # noqa: E402
from diffusekit.pipeline import Pipeline  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def ours(sd_folder) -> Pipeline:
    return Pipeline.from_pretrained(sd_folder, device="cpu")


@pytest.fixture(scope="module")
def theirs(sd_folder):
    return diffusers.StableDiffusionPipeline.from_pretrained(sd_folder).to("cpu")


# ----------------------------------------------------------------------------- loading: component parity


def test_a_stable_diffusion_folder_maps_to_the_right_config(ours):
    c = ours.config
    assert (c.model.channels, c.model.attention_levels, c.model.attention_heads, c.model.cross_attention_dim) == ((16, 32), (0,), 2, 32)
    assert (c.diffusion.schedule, c.diffusion.beta_start, c.diffusion.prediction) == ("scaled_linear", 0.00085, "eps")
    assert (c.sample.sampler, c.sample.spacing, c.sample.steps_offset, c.sample.guidance) == ("ddim", "leading", 1, 7.5)
    assert (c.text.max_length, c.text.mask_padding, c.data.image_size, c.vae.scale_factor) == (77, False, 16, 0.18215)


def test_unet_vae_and_text_encoder_match_diffusers(ours, theirs):
    torch.manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.randn(2, 77, 32)
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        unet_diff = max_diff(ours.net(x, t, context=ctx), theirs.unet(x, t, encoder_hidden_states=ctx).sample)
        decode_diff = max_diff(ours.vae.decode(x[:1]), theirs.vae.decode(x[:1]).sample)
        encode_diff = max_diff(ours.vae.encode(image).mean, theirs.vae.encode(image).latent_dist.mean)
        hidden, _ = ours.text_encoder.encode([PROMPT, ""])
        their_hidden = theirs.encode_prompt([PROMPT, ""], "cpu", 1, False)[0]
    assert max(unet_diff, decode_diff, encode_diff, max_diff(hidden, their_hidden)) <= TOL


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_text_to_image_sampling_matches_stable_diffusion_pipeline(ours, theirs, sampler):
    """Same prompt, same initial latents, guidance 3 (the unconditional branch counts), images in [0, 1]."""
    latents = initial_latents(2)
    if sampler == "ddim":  # the folder's own spacing: leading with steps_offset 1
        scheduler, spacing = sd_scheduler(set_alpha_to_one=True), None
    else:  # diffusers' DPM-Solver spaces leading steps its own way (n + 1 points); trailing agrees
        scheduler, spacing = diffusers.DPMSolverMultistepScheduler.from_config(sd_scheduler().config, timestep_spacing="trailing"), "trailing"
    expected = run_diffusers(theirs, scheduler, latents, steps=4, guidance=3.0)
    images = ours.sample(2, steps=4, sampler=sampler, spacing=spacing, prompts=PROMPT, guidance=3.0, noise=latents)
    assert expected.std() > 0.01
    assert max_diff((images + 1) / 2, expected) <= TOL


def test_ddim_ends_at_sigma_zero_where_diffusers_stops_at_abar0_with_set_alpha_to_one_false(ours, theirs):
    """Deliberate difference: with Stable Diffusion's set_alpha_to_one = false, diffusers' last DDIM step lands
    on abar_0 (noise level sqrt(1 - abar_0) ~ 0.03) instead of the clean latent. diffusekit ends at sigma = 0;
    diffusers' result is diffusekit's x0 moved to abar_0 along the last step's (guided) eps."""
    latents, steps, seen = initial_latents(), 4, {}

    def record(info):
        seen[info["i"]] = (info["x"].clone(), info["denoised"].clone(), info["sigma"])

    ours.sample(1, steps=steps, sampler="ddim", prompts=PROMPT, guidance=3.0, noise=latents, callback=record)
    sigma_last = seen[steps - 1][2].float()
    x_before, x0 = seen[steps - 2][0], seen[steps - 1][1]
    eps = (x_before - x0) / sigma_last
    abar0 = ours.schedule.alphas_cumprod[0].float()
    expected = run_diffusers(theirs, sd_scheduler(), latents, steps, 3.0, output_type="latent")
    assert max_diff(abar0.sqrt() * x0 + (1 - abar0).sqrt() * eps, expected) <= TOL
    assert max_diff(x0, expected) > 1e-2


def test_generate_cli_runs_a_stable_diffusion_folder(sd_folder, tmp_path):
    out = tmp_path / "gen.png"
    assert cli_main(["generate", PROMPT, "--model", str(sd_folder), "--n", "1", "--steps", "2", "--device", "cpu", "--out", str(out)]) == 0
    assert out.is_file()

def test_stable_diffusion_2_style_unet_and_v_prediction_sample_the_same(sd_folder, tmp_path):
    """Linear projections, head counts that grow with the width (one head width), v-prediction, zero terminal SNR, trailing steps."""
    folder = tmp_path / "sd2"
    shutil.copytree(sd_folder, folder)
    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True,
    )
    shutil.rmtree(folder / "unet")
    perturb(unet, 8).save_pretrained(folder / "unet")
    sd_scheduler(prediction_type="v_prediction", timestep_spacing="trailing", set_alpha_to_one=True, rescale_betas_zero_snr=True).save_pretrained(folder / "scheduler")
    pipe = Pipeline.from_pretrained(folder, device="cpu")
    m = pipe.config.model
    assert (m.linear_projection, m.attention_heads, m.attention_head_dim) == (True, 0, 8)
    assert (pipe.config.diffusion.prediction, pipe.config.diffusion.zero_terminal_snr, pipe.config.sample.spacing) == ("v", True, "trailing")
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    latents = initial_latents(1, seed=2)
    expected = run_diffusers(theirs, theirs.scheduler, latents, steps=4, guidance=2.0)
    images = pipe.sample(1, steps=4, prompts=PROMPT, guidance=2.0, noise=latents)
    # diffusers' DDIM starts at abar = 0, diffusekit at its 2^-24 floor (schedule.MIN_ALPHA_CUMPROD): the first x0_hat
    # moves by 2^-12 x_t, about 1e-4 in these images (measured: with a 2^-40 floor the two agree to 1e-6)
    assert max_diff((images + 1) / 2, expected) <= 2 * TOL


# Stable Diffusion 1.5's own config files (stable-diffusion-v1-5/stable-diffusion-v1-5), as diffusers 0.6 wrote them
SD15 = {
    "model_index.json": {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0", "feature_extractor": ["transformers", "CLIPImageProcessor"],
                         "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"], "scheduler": ["diffusers", "PNDMScheduler"],
                         "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                         "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]},
    "unet/config.json": {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
                         "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
                         "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                         "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
                         "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
                         "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]},
    "vae/config.json": {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
                        "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
                        "norm_num_groups": 32, "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4},
    "scheduler/scheduler_config.json": {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                                        "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                                        "steps_offset": 1, "trained_betas": None, "clip_sample": False},
    "tokenizer/tokenizer_config.json": {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"},
}


def test_stable_diffusion_1_5_configs_map_to_its_shape_and_back(tmp_path):
    from diffusekit.io.diffusers import find_parts, read_config, unet_config

    for name, data in SD15.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps(data))
    (tmp_path / "text_encoder").mkdir()
    config = read_config(find_parts(tmp_path))
    m = config.model
    assert (m.channels, m.layers_per_block, m.attention_levels, m.attention_heads, m.cross_attention_dim) == ((320, 640, 1280, 1280), 2, (0, 1, 2), 8, 768)
    assert (config.data.image_size, config.vae.channels, config.vae.scale_factor, config.latent.vae) == (512, (128, 256, 512, 512), 0.18215, str(tmp_path / "vae"))
    assert (config.sample.sampler, config.sample.spacing, config.sample.steps_offset) == ("dpmpp_2m", "leading", 1)  # no PNDM in diffusekit
    written = unet_config(config)
    assert {k: v for k, v in SD15["unet/config.json"].items() if k != "_diffusers_version"} == {k: written[k] for k in SD15["unet/config.json"] if k != "_diffusers_version"}


# ----------------------------------------------------------------------------- UNet2DModel / DDPMPipeline


def tiny_unet2d(num_class_embeds=None):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                                 attention_head_dim=8, num_class_embeds=num_class_embeds)
    return perturb(unet, 4)


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory) -> Path:
    scheduler = diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False)
    folder = tmp_path_factory.mktemp("ddpm") / "tiny-ddpm"
    diffusers.DDPMPipeline(unet=tiny_unet2d(), scheduler=scheduler).save_pretrained(folder)
    return folder


def sample_ddpm_pipeline(pipe, n: int, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the noise DDPMPipeline starts from, its images in [0, 1] as NCHW)."""
    size, channels = pipe.unet.config.sample_size, pipe.unet.config.in_channels
    noise = torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))
    images = pipe(batch_size=n, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps, output_type="np").images
    return noise, torch.from_numpy(images).permute(0, 3, 1, 2)


@pytest.mark.parametrize("part", ["pipeline folder", "lone unet folder"])
def test_unet2dmodel_loads_and_samples_as_ddpm_pipeline(ddpm_folder, part):
    pipe = Pipeline.from_pretrained(ddpm_folder if part == "pipeline folder" else ddpm_folder / "unet", device="cpu")
    assert (pipe.config.sample.spacing, pipe.config.data.channels, pipe.config.data.image_size) == ("leading", 3, 8)
    theirs = diffusers.DDPMPipeline.from_pretrained(ddpm_folder)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 900.0])
    with torch.no_grad():
        assert max_diff(pipe.net(x, t), theirs.unet(x, t).sample) <= TOL
    noise, expected = sample_ddpm_pipeline(theirs, 2, steps=5, seed=3)
    images = pipe.sample(2, steps=5, sampler="ddim", noise=noise)
    assert max_diff((images + 1) / 2, expected) <= TOL


def test_class_conditional_unet2dmodel_keeps_its_last_class_as_the_null_class(tmp_path):
    ref = tiny_unet2d(num_class_embeds=4)
    ref.save_pretrained(tmp_path / "unet")
    pipe = Pipeline.from_pretrained(tmp_path / "unet", device="cpu")
    assert pipe.config.model.num_classes == 3
    x, t, labels = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 900.0]), torch.tensor([0, 3])
    with torch.no_grad():
        assert max_diff(pipe.net(x, t, class_labels=labels), ref(x, t, class_labels=labels).sample) <= TOL


def test_original_ddpm_unet_details_load_and_export(tmp_path):
    """google/ddpm-*'s U-Nets (converted from Ho et al.'s code) embed time as [sin, cos] with a
    shifted frequency, pad before downsampling on the right and bottom only, and use GroupNorm eps 1e-6."""
    torch.manual_seed(0)
    ref = perturb(diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                                        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                                        attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6), 4)
    diffusers.DDPMPipeline(unet=ref, scheduler=diffusers.DDPMScheduler(variance_type="fixed_large", clip_sample=False)).save_pretrained(tmp_path / "ddpm")
    pipe = Pipeline.from_pretrained(tmp_path / "ddpm", device="cpu")
    m = pipe.config.model
    assert (m.flip_sin_to_cos, m.freq_shift, m.downsample_padding, m.norm_eps, m.attention_heads) == (False, 1, 0, 1e-6, 1)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 900.0])
    with torch.no_grad():
        assert max_diff(pipe.net(x, t), ref(x, t).sample) <= TOL
        downsampler = pipe.net.down_blocks[0].downsamplers[0]  # the padding matters: padding all sides gives another output
        downsampler.asymmetric, downsampler.conv.padding = False, (1, 1)
        assert max_diff(pipe.net(x, t), ref(x, t).sample) > 1e-3
    written = unet_config(pipe.config)
    assert (written["flip_sin_to_cos"], written["freq_shift"], written["downsample_padding"], written["norm_eps"]) == (False, 1, 0, 1e-6)


# ----------------------------------------------------------------------------- clear errors for what diffusekit cannot read


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


UNSUPPORTED = [
    ("unet/config.json", lambda c: c["down_block_types"].__setitem__(1, "KDownBlock2D"), r"unet/config.json: down_block_types\[1\] = 'KDownBlock2D' is not supported; diffusekit reads DownBlock2D, CrossAttnDownBlock2D"),
    ("unet/config.json", lambda c: c.__setitem__("up_block_types", ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]), r"up_block_types\[0\] = 'CrossAttnUpBlock2D' .* must be 'UpBlock2D'"),
    ("unet/config.json", lambda c: c.__setitem__("act_fn", "gelu"), r"act_fn = 'gelu' is not supported; diffusekit builds only act_fn = \"silu\""),
    ("unet/config.json", lambda c: c.__setitem__("center_input_sample", True), r"center_input_sample = True is not supported"),
    ("unet/config.json", lambda c: c.__setitem__("addition_embed_type", "text_time"), r"addition_embed_type = 'text_time' is not supported"),
    ("unet/config.json", lambda c: c.__setitem__("attention_head_dim", [2, 3]), r"attention_head_dim = \[2, 3\] gives neither one head count nor one head width"),
    ("unet/config.json", lambda c: c.__setitem__("out_channels", 8), r"out_channels = 8 differs from in_channels = 4"),
    ("unet/config.json", lambda c: c.__setitem__("brand_new_feature", 3), r"brand_new_feature = 3 is not a key diffusekit knows"),
    ("unet/config.json", lambda c: c.__setitem__("_class_name", "UNet3DConditionModel"), r"_class_name = 'UNet3DConditionModel' is not supported"),
    ("vae/config.json", lambda c: c.__setitem__("latents_mean", [0.1] * 4), r"vae/config.json: latents_mean = \[0.1, .*\] is not supported"),
    ("scheduler/scheduler_config.json", lambda c: c.__setitem__("beta_schedule", "exotic"), r"beta_schedule = 'exotic' is not supported; diffusekit reads linear, scaled_linear, squaredcos_cap_v2, sigmoid"),
    ("scheduler/scheduler_config.json", lambda c: c.__setitem__("timestep_spacing", "random"), r"timestep_spacing = 'random' is not supported"),
    ("model_index.json", lambda c: c.__setitem__("text_encoder_2", ["transformers", "CLIPTextModelWithProjection"]), r"component text_encoder_2 .* is not supported"),
]


@pytest.mark.parametrize("file, change, message", UNSUPPORTED, ids=[m[:40] for _, _, m in UNSUPPORTED])
def test_unsupported_diffusers_config_values_are_clear_errors(sd_folder, tmp_path, file, change, message):
    folder = tmp_path / "sd"
    shutil.copytree(sd_folder, folder)
    edit_json(folder / file, change)
    with pytest.raises(UserError, match=message):
        Pipeline.from_pretrained(folder, device="cpu")


def test_cli_prints_an_unsupported_value_as_one_error_line(sd_folder, tmp_path, capsys):
    folder = tmp_path / "sd"
    shutil.copytree(sd_folder, folder)
    edit_json(folder / "unet/config.json", lambda c: c.__setitem__("mid_block_scale_factor", 2))
    assert cli_main(["generate", PROMPT, "--model", str(folder), "--n", "1", "--steps", "1", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unet/config.json: mid_block_scale_factor = 2 is not supported")


def test_bin_weights_are_read_without_unpickling_code(ddpm_folder, tmp_path):
    folder = tmp_path / "unet"
    shutil.copytree(ddpm_folder / "unet", folder)
    from safetensors.torch import load_file

    torch.save(load_file(folder / "diffusion_pytorch_model.safetensors"), folder / "diffusion_pytorch_model.bin")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    assert Pipeline.from_pretrained(folder, device="cpu").config.data.channels == 3

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"conv_in.weight": Evil()}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match="cannot read .* safely"):
        Pipeline.from_pretrained(folder, device="cpu")


def shard_folder(ddpm_folder: Path, tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A copy of the tiny UNet2DModel with its weights split in two shards beside their index."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "unet"
    shutil.copytree(ddpm_folder / "unet", folder)
    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(weights)
    halves = {"part-1.safetensors": keys[: len(keys) // 2], "part-2.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_file({k: weights[k].contiguous() for k in part}, folder / name)
    weight_map = {k: name for name, part in halves.items() for k in part}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder, weights


def test_sharded_weights_load_like_one_file(ddpm_folder, tmp_path):
    folder, _ = shard_folder(ddpm_folder, tmp_path)
    whole = Pipeline.from_pretrained(ddpm_folder / "unet", device="cpu").net.state_dict()
    sharded = Pipeline.from_pretrained(folder, device="cpu").net.state_dict()
    assert all(torch.equal(whole[k], sharded[k]) for k in whole)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", ".."])
def test_a_shard_index_naming_a_file_outside_the_folder_is_refused(ddpm_folder, tmp_path, shard, monkeypatch):
    folder, weights = shard_folder(ddpm_folder, tmp_path)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: shard for k in weights}}))
    opened = []
    import diffusekit.io.diffusers as reader

    monkeypatch.setattr(reader, "read_tensors", lambda path, *a, **k: opened.append(path))
    with pytest.raises(UserError, match="reads no file outside the model folder"):
        Pipeline.from_pretrained(folder, device="cpu")
    assert opened == []


def test_the_cli_refuses_an_outside_shard_in_one_line(ddpm_folder, tmp_path, capsys):
    folder, weights = shard_folder(ddpm_folder, tmp_path)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "../x.safetensors" for k in weights}}))
    assert cli_main(["sample", str(folder), "--n", "1", "--steps", "1", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "outside the model folder" in err[0]
    assert not (tmp_path / "x.png").exists()

def test_a_diffusekit_run_is_not_taken_for_a_diffusers_folder(trained_run):
    assert not is_diffusers_folder(trained_run) and not is_diffusers_folder(trained_run / "checkpoints" / "latest")


# ----------------------------------------------------------------------------- export


def save_run(folder: Path, config, net: torch.nn.Module, vae: torch.nn.Module | None = None) -> Path:
    """A diffusekit checkpoint of these weights, as a training run saves it."""
    tensors = {"ema": net.state_dict(), **({"vae": vae.state_dict()} if vae is not None else {})}
    save_checkpoint(folder, 0, tensors, {"step": 0}, config_to_dict(config))
    return folder


def test_exported_pixel_run_loads_in_diffusers_and_samples_the_same(tmp_path):
    config = tiny_config(diffusion__prediction="v")  # v-prediction: a random net's samples do not all saturate
    torch.manual_seed(0)
    run = save_run(tmp_path / "run", config, perturb(build_net(config), 7))
    out = tmp_path / "export"
    assert cli_main(["export", str(run), "--format", "diffusers", str(out)]) == 0
    pipe = Pipeline.from_pretrained(run, device="cpu")
    theirs = diffusers.DDPMPipeline.from_pretrained(out)
    assert type(theirs.scheduler).__name__ == "DDIMScheduler" and theirs.scheduler.config.timestep_spacing == "trailing"
    assert theirs.scheduler.config.prediction_type == "v_prediction"
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 60.0])
    with torch.no_grad():
        assert max_diff(pipe.net(x, t), theirs.unet(x, t).sample) <= TOL
    noise, expected = sample_ddpm_pipeline(theirs, 2, steps=5, seed=1)
    assert ((expected > 0.01) & (expected < 0.99)).float().mean() > 0.5
    assert max_diff((pipe.sample(2, steps=5, noise=noise) + 1) / 2, expected) <= TOL
    back = Pipeline.from_pretrained(out, device="cpu")  # and back into diffusekit: the same network and sampler
    with torch.no_grad():
        assert max_diff(back.net(x, t), pipe.net(x, t)) == 0
    assert (back.config.sample.sampler, back.config.sample.spacing, back.config.diffusion) == ("ddim", "trailing", pipe.config.diffusion)


def test_exported_class_conditional_run_is_a_unet2dmodel_with_a_null_class(tmp_path, capsys):
    config = tiny_config(model__num_classes=3)
    torch.manual_seed(0)
    net = perturb(build_net(config), 6)
    out = tmp_path / "export"
    assert cli_main(["export", str(save_run(tmp_path / "run", config, net)), str(out)]) == 0
    assert "class_labels" in capsys.readouterr().out
    unet = diffusers.UNet2DModel.from_pretrained(out / "unet")
    assert unet.config.num_class_embeds == 4
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 60.0]), torch.tensor([1, 3])
    with torch.no_grad():
        assert max_diff(net(x, t, class_labels=labels), unet(x, t, class_labels=labels).sample) <= TOL
    with pytest.raises(ValueError, match="class_labels"):
        diffusers.DDPMPipeline.from_pretrained(out)(batch_size=1, num_inference_steps=1)


def test_exported_text_to_image_run_is_a_stable_diffusion_pipeline_that_samples_the_same(ours, tmp_path):
    """A run that pads prompts to 20 tokens: the exported tokenizer makes diffusers pad to 20 too."""
    config = replace(ours.config, text=replace(ours.config.text, max_length=20))
    run = save_run(tmp_path / "run", config, ours.net, ours.vae)
    assert export_diffusers(run, tmp_path / "export") == []
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "export")
    assert theirs.tokenizer.model_max_length == 20 and type(theirs.scheduler).__name__ == "DDIMScheduler"
    latents = initial_latents(2, seed=9)
    expected = run_diffusers(theirs, theirs.scheduler, latents, steps=3, guidance=2.0)
    images = Pipeline.from_pretrained(run, device="cpu").sample(2, steps=3, prompts=PROMPT, guidance=2.0, noise=latents)
    assert max_diff((images + 1) / 2, expected) <= TOL


def test_a_minilm_model_is_not_a_stable_diffusion_pipeline_but_its_unet_and_vae_export(ours, tmp_path, capsys):
    c = ours.config
    config = validate(replace(c, text=replace(c.text, encoder="minilm", max_length=16), model=replace(c.model, cross_attention_dim=384)))
    torch.manual_seed(0)
    net, vae = build_net(config), build_vae(config)
    run = save_run(tmp_path / "run", config, net, vae)
    assert cli_main(["export", str(run), str(tmp_path / "sd")]) == 2
    err = capsys.readouterr().err
    assert "needs a CLIPTextModel text encoder" in err and "bert" in err and "--components unet,scheduler,vae,text_encoder" in err
    assert cli_main(["export", str(run), str(tmp_path / "parts"), "--components", "unet,vae"]) == 0
    assert not (tmp_path / "parts" / "model_index.json").exists()
    unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "parts" / "unet")
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([30.0]), torch.randn(1, 16, 384)
    with torch.no_grad():
        assert max_diff(net.eval()(x, t, context=ctx), unet(x, t, encoder_hidden_states=ctx).sample) <= TOL
    diffusers.AutoencoderKL.from_pretrained(tmp_path / "parts" / "vae")


def test_export_refuses_a_folder_that_is_not_empty(trained_run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not an empty folder"):
        export_diffusers(trained_run, tmp_path / "out")


# ----------------------------------------------------------------------------- memory at large sizes


def test_sliced_attention_equals_unsliced(monkeypatch):
    torch.manual_seed(0)
    self_attention, cross = SelfAttention2D(16, heads=2, groups=4).eval(), Attention(16, 2, context_dim=12).eval()
    x, tokens, ctx, mask = torch.randn(2, 16, 6, 6), torch.randn(2, 36, 16), torch.randn(2, 5, 12), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        whole = self_attention(x), cross(tokens, ctx, mask)
        monkeypatch.setattr(Attention, "query_chunk", 7)  # 36 queries in slices of 7
        sliced = self_attention(x), cross(tokens, ctx, mask)
    assert max(max_diff(a, b) for a, b in zip(whole, sliced)) <= 1e-6


def test_large_images_are_decoded_one_at_a_time_with_the_same_result(ours, monkeypatch):
    latents = initial_latents(3)
    whole = ours.decode(latents)
    calls = []
    decode = ours.vae.decoder.forward
    monkeypatch.setattr(ours.vae.decoder, "forward", lambda z: calls.append(len(z)) or decode(z))
    monkeypatch.setattr("diffusekit.pipeline.LARGE_IMAGE_PIXELS", 16 * 16)
    assert max_diff(ours.decode(latents), whole) <= 1e-6 and calls == [1, 1, 1]


def test_initial_noise_of_the_wrong_shape_is_a_user_error(ours):
    with pytest.raises(UserError, match="noise has shape"):
        ours.sample(2, steps=1, prompts=PROMPT, noise=initial_latents(1))



def test_steps_offset_shifts_leading_timesteps_and_is_validated():
    config = tiny_config(sample__steps_offset=1)
    pipe, plain = Pipeline(config, build_net(config)), Pipeline(tiny_config(), build_net(config))
    assert torch.equal(pipe.sigmas(5, "leading")[:-1], plain.schedule.sigmas[torch.tensor([81, 61, 41, 21, 1])])
    assert torch.equal(pipe.sigmas(5, "trailing"), plain.sigmas(5, "trailing"))  # only leading spacing is offset
    with pytest.raises(ConfigError, match="sample.steps_offset"):
        tiny_config(sample__steps_offset=-1)
