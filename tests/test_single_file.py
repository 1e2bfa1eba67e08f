"""Stable Diffusion single files (the original CompVis / Stability layout), read and written, checked against diffusers.

Tiny random SD 1.x (CLIP text encoder, 8 heads per level) and SD 2.x (OpenCLIP-shaped text encoder with GELU and
"!" padding, linear projections, heads 64 wide, v-prediction) pipelines are built here with diffusers, written as
single files through diffusekit's key table, and loaded both by diffusers' from_single_file (given the pipeline's
folder as its config) and by diffusekit with the family's defaults alone: same weights, same U-Net output, same
text embeddings, same image from the same noise. The CLIP tokenizer is built from open-clip-torch's vocabulary.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
if importlib.util.find_spec("open_clip") is None:
    pytest.skip("open-clip-torch (its CLIP vocabulary) is not installed: pip install --no-deps open-clip-torch", allow_module_level=True)

from conftest import PROMPT, assert_user_error, cli, initial_latents, max_diff, perturb, random_images, run_diffusers, sd_scheduler, write_images  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from diffusekit.config import config_to_dict  # noqa: E402
from diffusekit.io.checkpoint import save_checkpoint  # noqa: E402
from diffusekit.io.clip_vocab import write_clip_tokenizer  # noqa: E402
from diffusekit.io.diffusers import find_parts, read_config  # noqa: E402
from diffusekit.io.single_file_export import original_weights, text_weights  # noqa: E402
from diffusekit.models import build_net, build_vae  # noqa: E402
from diffusekit.pipeline import Pipeline  # noqa: E402

TOL = 1e-4
FAMILIES = ["sd1", "sd2"]


def tiny_pipeline(family: str, folder):
    """A tiny SD pipeline of the family's conventions, saved in `folder`: 16 px images, 8x8 latents, a 2-layer text encoder."""
    sd2 = family == "sd2"
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128) if sd2 else (32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=[1, 2] if sd2 else 8, use_linear_projection=sd2)
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, sample_size=16)
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                                         max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu", bos_token_id=49406, eos_token_id=49407)
    write_clip_tokenizer(folder / "clip-tokenizer", pad_token="!" if sd2 else "<|endoftext|>")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder / "clip-tokenizer"))
    scheduler = sd_scheduler(prediction_type="v_prediction") if sd2 else diffusers.PNDMScheduler.from_config(sd_scheduler().config, skip_prk_steps=True)
    pipe = diffusers.StableDiffusionPipeline(vae=perturb(vae, 2), text_encoder=perturb(transformers.CLIPTextModel(config), 1), tokenizer=tokenizer,
                                             unet=perturb(unet, 3), scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipeline")
    return pipe, folder / "pipeline"


@pytest.fixture(scope="module", params=FAMILIES)
def sd(request, tmp_path_factory):
    """(family, the diffusers pipeline, its folder, the single file written from it by diffusekit's key table)."""
    folder = tmp_path_factory.mktemp(request.param)
    pipe, pipe_folder = tiny_pipeline(request.param, folder)
    config = read_config(find_parts(pipe_folder))
    tensors = original_weights(config, pipe.unet.state_dict(), pipe.vae.state_dict(), text_weights(pipe.text_encoder), request.param == "sd2")
    path = folder / f"tiny-{request.param}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return request.param, pipe, pipe_folder, path


@pytest.fixture(scope="module")
def theirs(sd):
    _, _, folder, path = sd
    return diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True).to("cpu")


@pytest.fixture(scope="module")
def ours(sd, tmp_path_factory):
    return Pipeline.from_single_file(sd[3], device="cpu")


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- the tokenizer, the key table against diffusers' conversion


def test_the_tokenizer_built_from_open_clips_vocabulary_gives_clips_ids(tmp_path):
    """OpenAI CLIP's ids for this sentence (start 49406, end 49407); SD 2.x pads with "!" (id 0), SD 1.x with the end token."""
    for pad, pad_id in (("<|endoftext|>", 49407), ("!", 0)):
        write_clip_tokenizer(tmp_path / str(pad_id), pad_token=pad)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / str(pad_id)), local_files_only=True)
        assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
        assert tokenizer("a photo of a cat", padding="max_length", max_length=9)["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407, pad_id, pad_id]



def test_the_original_layout_keys(sd):
    family, _, _, path = sd
    keys = load_file(str(path)).keys()
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in keys and "first_stage_model.decoder.up.1.block.1.conv1.weight" in keys
    text = "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" if family == "sd2" else \
        "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight"
    assert text in keys and not any(k.startswith(("down_blocks", "encoder.down_blocks")) for k in keys)


def test_diffusers_from_single_file_reads_the_file_to_the_pipelines_weights(sd, theirs):
    _, pipe, _, _ = sd
    assert same_weights(theirs.unet, pipe.unet) and same_weights(theirs.vae, pipe.vae) and same_weights(theirs.text_encoder, pipe.text_encoder)


def test_the_tables_match_diffusers_conversion_at_stable_diffusions_own_layout():
    """SD's block layout at small widths: 4 levels of 2 layers, attention at the first three (so up blocks with both
    attention and an upsampler), 2-level VAE blocks; diffusers' own converters are the oracle."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from diffusekit.io.single_file import FAMILIES, unet_config, vae_config
    from diffusekit.io.single_file_keys import to_diffusers, to_original, unet_table, vae_table

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(block_out_channels=(32, 64, 64, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=8)
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 32, 64, 64), layers_per_block=2, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    unet_file = to_original(unet.state_dict(), unet_table(4, 2, (0, 1, 2)))
    vae_file = to_original(vae.state_dict(), vae_table(4, 2))
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in unet_file and "first_stage_model.decoder.up.3.block.2.conv1.weight" in vae_file
    for theirs, ours in ((convert_ldm_unet_checkpoint(unet_file, unet.config), unet.state_dict()),
                         (convert_ldm_vae_checkpoint(vae_file, vae.config), vae.state_dict())):
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k].reshape(ours[k].shape), ours[k]) for k in ours)
    both = {**unet_file, **vae_file}
    assert to_diffusers(unet_file, unet_table(4, 2, (0, 1, 2)))[0].keys() == unet.state_dict().keys()
    shape = unet_config(both, FAMILIES["sd1"], "file")
    assert (shape["block_out_channels"], shape["layers_per_block"], shape["down_block_types"]) == ([32, 64, 64, 64], 2, list(unet.config.down_block_types))
    assert (vae_config(both)["block_out_channels"], vae_config(both)["layers_per_block"]) == ([32, 32, 64, 64], 2)


# ----------------------------------------------------------------------------- diffusekit reads it as diffusers does


def test_the_family_is_told_from_the_weights(sd, ours):
    family, _, _, _ = sd
    c = ours.config
    assert c.model.linear_projection == (family == "sd2") and c.model.cross_attention_dim == 64
    assert (c.diffusion.schedule, c.diffusion.beta_start, c.diffusion.beta_end, c.sample.steps_offset) == ("scaled_linear", 0.00085, 0.012, 1)
    assert c.diffusion.prediction == ("v" if family == "sd2" else "eps")
    latents = 96 if family == "sd2" else 64  # 768 / 512 px with SD's VAE (8x); this tiny one halves once
    assert c.data.image_size == latents * 2 and c.text.max_length == 77 and not c.text.mask_padding


def test_unet_vae_and_text_encoder_match_diffusers(ours, theirs):
    torch.manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.randn(2, 77, 64)
    with torch.no_grad():
        unet_diff = max_diff(ours.net(x, t, context=ctx), theirs.unet(x, t, encoder_hidden_states=ctx).sample)
        decode_diff = max_diff(ours.vae.decode(x[:1]), theirs.vae.decode(x[:1]).sample)
        hidden, _ = ours.text_encoder.encode([PROMPT, ""])
        their_hidden = theirs.encode_prompt([PROMPT, ""], "cpu", 1, False)[0]
    assert max(unet_diff, decode_diff, max_diff(hidden, their_hidden)) <= TOL


def test_the_same_image_as_diffusers_from_the_same_noise(sd, ours, theirs):
    family = sd[0]
    latents = initial_latents(2)
    scheduler = sd_scheduler(set_alpha_to_one=True, prediction_type="v_prediction" if family == "sd2" else "epsilon")
    expected = run_diffusers(theirs, scheduler, latents, steps=4, guidance=3.0)
    images = ours.sample(2, steps=4, sampler="ddim", prompts=PROMPT, guidance=3.0, size=16, noise=latents)
    assert expected.std() > 0.01
    assert max_diff((images + 1) / 2, expected) <= TOL


def test_config_folder_and_set_replace_the_family_defaults(sd):
    family, _, folder, path = sd
    pipe = Pipeline.from_single_file(path, config=folder, device="cpu", overrides=["diffusion.prediction=x0"])
    assert pipe.config.diffusion.prediction == "x0" and pipe.config.data.image_size == 16  # the folder's sample_size 8, times 2
    assert pipe.config.sample.sampler == ("ddim" if family == "sd2" else "dpmpp_2m")


# ----------------------------------------------------------------------------- writing


def test_an_exported_run_loads_in_diffusers_with_the_same_outputs(sd, ours, tmp_path, capsys):
    """A diffusekit run (here: the single file's model saved as a run) -> export --format single-file -> diffusers."""
    family = sd[0]
    run = tmp_path / "run"
    net, vae = build_net(ours.config), build_vae(ours.config)
    net.load_state_dict(ours.net.state_dict())
    vae.load_state_dict(ours.vae.state_dict())
    save_checkpoint(run, 0, {"ema": net.state_dict(), "vae": vae.state_dict()}, {"step": 0}, config_to_dict(ours.config))
    out = tmp_path / "exported.safetensors"
    code, printed, _ = cli(capsys, "export", run, out, "--format", "single-file")
    assert code == 0 and ("SD 2.x" if family == "sd2" else "SD 1.x") in printed
    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(out), config=str(sd[2]), local_files_only=True)
    assert same_weights(theirs.unet, sd[1].unet) and same_weights(theirs.vae, sd[1].vae) and same_weights(theirs.text_encoder, sd[1].text_encoder)
    again = Pipeline.from_single_file(out, device="cpu")
    noise = initial_latents(1)
    first, second = (p.sample(1, steps=2, sampler="ddim", prompts=PROMPT, size=16, noise=noise) for p in (ours, again))
    assert max_diff(first, second) == 0


def test_generate_cli_takes_a_single_file(sd, tmp_path, capsys):
    out = tmp_path / "gen.png"
    code, _, err = cli(capsys, "generate", PROMPT, "--model", sd[3], "--n", "1", "--steps", "2", "--size", "16", "--device", "cpu", "--out", out)
    assert code == 0 and out.is_file(), err


def test_a_model_with_its_own_minilm_text_encoder_is_not_written_as_a_single_file(trained_run, tmp_path, capsys):
    assert_user_error(cli(capsys, "export", trained_run, tmp_path / "x.safetensors", "--format", "single-file"),
                      "cannot be written as a Stable Diffusion single file")
    assert not (tmp_path / "x.safetensors").exists()


# ----------------------------------------------------------------------------- bad files


def generate(capsys, path, tmp_path):
    return cli(capsys, "generate", PROMPT, "--model", path, "--n", "1", "--steps", "1", "--device", "cpu", "--out", tmp_path / "out.png")


def rewritten(sd, tmp_path, name, change):
    tensors = load_file(str(sd[3]))
    change(tensors)
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


def test_bad_single_files_are_one_line_naming_the_file(sd, tmp_path, capsys):
    unknown = tmp_path / "unknown.safetensors"
    save_file({"some.weight": torch.zeros(2)}, str(unknown))
    assert_user_error(generate(capsys, unknown, tmp_path), "unknown.safetensors", "not a Stable Diffusion 1.x / 2.x checkpoint", "some")

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(sd[3].read_bytes()[: sd[3].stat().st_size // 2])
    assert_user_error(generate(capsys, truncated, tmp_path), "truncated.safetensors", "truncated", "download it again")

    def inpainting(tensors):
        tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)

    assert_user_error(generate(capsys, rewritten(sd, tmp_path, "inpaint.safetensors", inpainting), tmp_path), "inpaint.safetensors", "9 input channels")

    def sdxl(tensors):
        tensors["conditioner.embedders.1.model.positional_embedding"] = torch.zeros(77, 64)

    assert_user_error(generate(capsys, rewritten(sd, tmp_path, "xl.safetensors", sdxl), tmp_path), "xl.safetensors",
                      "SDXL single files are not supported yet")

    pickled = tmp_path / "code.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "callback": torch.nn.Identity()}, pickled)
    assert_user_error(generate(capsys, pickled, tmp_path), "code.ckpt", "needs pickled code")
    cut = tmp_path / "cut.ckpt"
    torch.save({"state_dict": load_file(str(sd[3]))}, cut)
    cut.write_bytes(cut.read_bytes()[:1000])
    assert_user_error(generate(capsys, cut, tmp_path), "cut.ckpt", "truncated")
    assert_user_error(generate(capsys, tmp_path / "missing.safetensors", tmp_path), "missing.safetensors", "does not exist")
    assert not (tmp_path / "out.png").exists()


def test_a_ckpt_of_plain_tensors_loads(sd, ours, tmp_path):
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": load_file(str(sd[3])), "global_step": 10}, path)
    pipe = Pipeline.from_single_file(path, device="cpu")
    assert same_weights(pipe.net, ours.net) and same_weights(pipe.vae, ours.vae)


def test_config_and_set_are_for_single_files_only(trained_run, tmp_path, capsys):
    assert_user_error(cli(capsys, "sample", trained_run, "--set", "diffusion.prediction=v", "--out", tmp_path / "s.png"),
                      "single-file checkpoints")


def test_finetune_takes_a_single_file_as_base_and_its_lora_loads_on_it(sd, tmp_path, capsys):
    data = tmp_path / "data"
    write_images(data, random_images(4, size=16, channels=3), names=[f"{i}.png" for i in range(4)])
    for i in range(4):
        (data / f"{i}.txt").write_text("a red apple")
    run = tmp_path / "run"
    fast = ["--quiet", "--lora-rank", "2", "--set", "train.threads=1", "--set", "sample.steps=2", "--set", "sample.n=2",
            "--set", "train.batch_size=2", "--set", "data.image_size=16"]
    code, _, err = cli(capsys, "finetune", sd[3], "--data", data, "--out", run, "--steps", "1", *fast)
    assert code == 0, err
    out = tmp_path / "tuned.png"
    code, _, err = cli(capsys, "generate", PROMPT, "--model", sd[3], "--lora", run, "--n", "1", "--steps", "1", "--size", "16",
                       "--device", "cpu", "--out", out)
    assert code == 0 and out.is_file(), err
