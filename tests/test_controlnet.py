"""ControlNets checked against diffusers: a tiny random ControlNetModel beside the tiny Stable Diffusion of conftest.

Its residuals, the U-Net fed with them, and StableDiffusionControlNetPipeline end to end (same weights, noise and
scheduler) against diffusekit; a ControlNet saved by diffusekit read back by diffusers; the control settings,
several ControlNets, the PNG field and the mistakes a user can make.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from conftest import PROMPT, assert_user_error, cli, initial_latents, max_diff, perturb, sd_scheduler  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from diffusekit.control import Control, step_of  # noqa: E402
from diffusekit.errors import DiffusekitWarning, UserError  # noqa: E402
from diffusekit.images import parse_parameters  # noqa: E402
from diffusekit.io.controlnet import read_controlnet, write_controlnet  # noqa: E402
from diffusekit.nn.controlnet import ControlNet  # noqa: E402
from diffusekit.pipeline import Pipeline  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def theirs(sd_folder):
    """diffusers' StableDiffusionControlNetPipeline over the tiny SD, with a ControlNet moved off its zero initialisation."""
    sd = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder)
    torch.manual_seed(0)
    controlnet = perturb(diffusers.ControlNetModel.from_unet(sd.unet, conditioning_embedding_out_channels=(8, 16)), 4, 0.1)
    return diffusers.StableDiffusionControlNetPipeline(**sd.components, controlnet=controlnet).to("cpu")


@pytest.fixture(scope="module")
def cn_folder(theirs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnet") / "tiny-canny"
    theirs.controlnet.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ours(sd_folder, cn_folder) -> Pipeline:
    return Pipeline.from_pretrained(sd_folder, device="cpu", controlnet=cn_folder)


def control_image(seed: int = 1) -> torch.Tensor:
    """[1, 3, 16, 16] in [0, 1], diffusers' range for control images (diffusekit takes [-1, 1])."""
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def inputs():
    torch.manual_seed(0)
    return torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.randn(2, 77, 32), torch.rand(2, 3, 16, 16)


# ----------------------------------------------------------------------------- the network and the files


@pytest.mark.parametrize("guess_mode", [False, True])
def test_controlnet_residuals_match_diffusers(cn_folder, theirs, guess_mode):
    ours = read_controlnet(cn_folder)
    x, t, ctx, control = inputs()
    with torch.no_grad():
        down, mid = ours(x, t, control, 0.7, context=ctx, guess_mode=guess_mode)
        their_down, their_mid = theirs.controlnet(x, t, ctx, control, conditioning_scale=0.7, guess_mode=guess_mode, return_dict=False)
    assert len(down) == len(their_down) == 4  # one per U-Net skip: conv_in, level 0 resnet + downsampler, level 1 resnet
    assert max(max_diff(a, b) for a, b in zip(down, their_down)) <= 1e-5 and max_diff(mid, their_mid) <= 1e-5
    assert float(mid.abs().max()) > 1e-3  # the residuals are not zero: the comparison means something


def test_unet_with_residuals_matches_diffusers(ours, theirs):
    x, t, ctx, control = inputs()
    with torch.no_grad():
        down, mid = theirs.controlnet(x, t, ctx, control, return_dict=False)
        mine = ours.net(x, t, context=ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        plain = ours.net(x, t, context=ctx)
        expected = theirs.unet(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    assert max_diff(mine, expected) <= 1e-5 and max_diff(plain, expected) > 1e-3


def test_a_controlnet_saved_by_diffusekit_loads_in_diffusers_with_the_same_output(cn_folder, tmp_path):
    ours = read_controlnet(cn_folder)
    write_controlnet(ours, tmp_path / "saved")
    back = diffusers.ControlNetModel.from_pretrained(tmp_path / "saved")
    x, t, ctx, control = inputs()
    with torch.no_grad():
        down, mid = ours(x, t, control, context=ctx)
        their_down, their_mid = back(x, t, ctx, control, return_dict=False)
    assert max(max_diff(a, b) for a, b in zip(down, their_down)) <= 1e-5 and max_diff(mid, their_mid) <= 1e-5
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())  # the very same weights
    with pytest.raises(UserError, match="not an empty folder"):  # what is there is kept
        write_controlnet(ours, tmp_path / "saved")


def test_from_unet_copies_the_encoder_as_diffusers_and_starts_at_zero(ours, theirs):
    fresh = ControlNet.from_unet(ours.net, ours.config.model, embedding_channels=(8, 16))
    reference = diffusers.ControlNetModel.from_unet(theirs.unet, conditioning_embedding_out_channels=(8, 16)).state_dict()
    state = fresh.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    copied = [k for k in state if k.split(".")[0] in ("conv_in", "time_embedding", "down_blocks", "mid_block")]
    assert copied and all(torch.equal(state[k], ours.net.state_dict()[k]) for k in copied)
    x, t, ctx, control = inputs()
    with torch.no_grad():
        down, mid = fresh(x, t, control, context=ctx)
    assert all(float(d.abs().max()) == 0 for d in down) and float(mid.abs().max()) == 0  # zero convolutions: no change yet


def original_layout(state: dict) -> dict:
    """diffusers' ControlNetModel names -> those of an original ControlNet 1.x file (the U-Net part through diffusekit's SD table)."""
    from diffusekit.io.single_file_keys import UNET_PREFIX, to_original, unet_table

    encoder = {k: v for k, v in state.items() if k.split(".")[0] in ("conv_in", "time_embedding", "down_blocks", "mid_block")}
    out = {k[len(UNET_PREFIX):]: v for k, v in to_original(encoder, unet_table(2, 1, (0,))).items()}
    blocks = sum(k.startswith("controlnet_cond_embedding.blocks.") and k.endswith(".weight") for k in state)
    for key, value in state.items():
        part, leaf = key.rsplit(".", 1)
        if part.startswith("controlnet_cond_embedding."):
            name = part.split(".", 1)[1]
            index = 0 if name == "conv_in" else 2 * (blocks + 1) if name == "conv_out" else 2 * (int(name.split(".")[1]) + 1)
            out[f"input_hint_block.{index}.{leaf}"] = value
        elif part.startswith("controlnet_down_blocks."):
            out[f"zero_convs.{part.split('.')[1]}.0.{leaf}"] = value
        elif part == "controlnet_mid_block":
            out[f"middle_block_out.0.{leaf}"] = value
    return out


def test_an_original_layout_controlnet_file_loads_as_diffusers_reads_it(ours, tmp_path):
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors.torch import save_file

    from diffusekit.io.controlnet_file import read_controlnet_file

    torch.manual_seed(0)  # SD's conditioning embedding (16, 32, 96, 256) and 32 norm groups, as the files people share
    theirs = perturb(diffusers.ControlNetModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
                                               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D")), 5, 0.05)
    original = original_layout(theirs.state_dict())
    converted = convert_controlnet_checkpoint(dict(original), dict(theirs.config))  # diffusers reads it as this very model
    assert converted.keys() == theirs.state_dict().keys() and all(torch.equal(v, theirs.state_dict()[k]) for k, v in converted.items())
    save_file({k: v.contiguous() for k, v in original.items()}, tmp_path / "control_tiny.safetensors")
    bundled = {**{f"control_model.{k}": v for k, v in original.items()}, "model.diffusion_model.out.2.bias": torch.zeros(4)}
    save_file({k: v.contiguous() for k, v in bundled.items()}, tmp_path / "control_bundled.safetensors")  # a 1.0 file: SD inside too
    x, t, ctx, _ = inputs()
    control = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        their_down, their_mid = theirs(x, t, ctx, control, return_dict=False)
        for name in ("control_tiny", "control_bundled"):
            down, mid = read_controlnet_file(tmp_path / f"{name}.safetensors")(x, t, control, context=ctx)
            assert max(max_diff(a, b) for a, b in zip(down, their_down)) <= 1e-5 and max_diff(mid, their_mid) <= 1e-5
    with pytest.raises(UserError, match="made for another base model"):  # 32 / 64 channels, the tiny SD has 16 / 32
        ours.load_controlnet(tmp_path / "control_tiny.safetensors")
    save_file({"weight": torch.zeros(2)}, tmp_path / "junk.safetensors")
    with pytest.raises(UserError, match="is not a ControlNet file"):
        read_controlnet_file(tmp_path / "junk.safetensors")


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("end", [1.0, 0.75])
def test_controlnet_sampling_matches_stable_diffusion_controlnet_pipeline(ours, theirs, end):
    """Same prompt, noise, control image and DDIM steps, guidance 3 (the control image goes to both halves)."""
    latents, control = initial_latents(2), control_image()
    theirs.scheduler = sd_scheduler(set_alpha_to_one=True)
    expected = theirs([PROMPT] * 2, image=control, num_inference_steps=4, guidance_scale=3.0, latents=latents.clone(), output_type="pt",
                      controlnet_conditioning_scale=0.8, control_guidance_end=end).images
    images = ours.sample(2, steps=4, sampler="ddim", prompts=PROMPT, guidance=3.0, noise=latents, control_image=control * 2 - 1,
                         controlnet_conditioning_scale=0.8, control_guidance_end=end)
    without = ours.sample(2, steps=4, sampler="ddim", prompts=PROMPT, guidance=3.0, noise=latents)
    assert max_diff((images + 1) / 2, expected) <= TOL
    assert max_diff((without + 1) / 2, expected) > 0.01  # the ControlNet changed the image


def test_two_controlnets_add_their_residuals(ours, cn_folder):
    """The same ControlNet twice at 0.5 and 0.3 steers as it does once at 0.8: the residuals are summed."""
    latents, control = initial_latents(1), control_image() * 2 - 1
    once = ours.sample(1, steps=3, sampler="ddim", prompts=PROMPT, guidance=3.0, noise=latents, control_image=control,
                       controlnet_conditioning_scale=0.8)
    ours.load_controlnet(cn_folder, name="again")
    try:
        twice = ours.sample(1, steps=3, sampler="ddim", prompts=PROMPT, guidance=3.0, noise=latents, control_image=[control, control],
                            controlnet_conditioning_scale=[0.5, 0.3])
        with pytest.raises(UserError, match="1 control image"):
            ours.sample(1, steps=3, prompts=PROMPT, control_image=control)
    finally:
        ours.unload_controlnet("again")
    assert max_diff(once, twice) <= 1e-5


def test_the_steps_a_controlnet_acts_in_follow_diffusers():
    """diffusers: at step i of N it acts unless i / N < start or (i + 1) / N > end."""
    control = Control(net=None, image=torch.zeros(1), start=0.25, end=0.75)
    assert [control.acts_at(i, 4) for i in range(4)] == [False, True, True, False]
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    assert [step_of(s, sigmas) for s in (10.0, 5.0, 3.0, 1.0)] == [0, 1, 2, 3]


def test_images_record_the_controlnet_as_automatic1111s_extension(ours):
    picture = Image.new("RGB", (16, 16))
    ImageDraw.Draw(picture).line((0, 0, 15, 15), fill="white")
    out = ours(PROMPT, n=1, steps=2, control_image=picture, controlnet_conditioning_scale=0.8, control_guidance_end=0.5)
    hash_ = ours.controlnets["tiny-canny"][1]
    field = f"Module: none, Model: tiny-canny [{hash_}], Weight: 0.8, Guidance Start: 0, Guidance End: 0.5"
    assert parse_parameters(out.parameters[0])["ControlNet 0"] == field
    assert "ControlNet" not in ours(PROMPT, n=1, steps=2).parameters[0]


# ----------------------------------------------------------------------------- mistakes


def test_bad_control_settings_name_the_value_and_the_fix(ours, sd_folder):
    control = control_image() * 2 - 1
    with pytest.raises(UserError, match="controlnet_conditioning_scale = 'strong' is not a number"):
        ours.sample(1, steps=2, prompts=PROMPT, control_image=control, controlnet_conditioning_scale="strong")
    with pytest.raises(UserError, match="0 <= start < end <= 1"):
        ours.sample(1, steps=2, prompts=PROMPT, control_image=control, control_guidance_start=0.8, control_guidance_end=0.2)
    with pytest.raises(UserError, match="is a str; give a picture"):
        ours.sample(1, steps=2, prompts=PROMPT, control_image="edges.png")
    with pytest.warns(DiffusekitWarning, match="resized to 16x16"):
        ours.sample(1, steps=2, prompts=PROMPT, control_image=torch.zeros(1, 3, 32, 32))
    plain = Pipeline.from_pretrained(sd_folder, device="cpu")
    with pytest.raises(UserError, match="a control image needs a ControlNet"):
        plain.sample(1, steps=2, prompts=PROMPT, control_image=control)


def test_a_controlnet_for_another_base_model_is_refused(ours, tmp_path):
    other = diffusers.ControlNetModel(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=64,
                                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=2,
                                      conditioning_embedding_out_channels=(8, 16))
    other.save_pretrained(tmp_path / "wide")
    with pytest.raises(UserError, match="made for another base model.*cross-attention width 64"):
        ours.load_controlnet(tmp_path / "wide")
    assert list(ours.controlnets) == ["tiny-canny"]


def edges_png(path, size=(20, 16)):
    picture = Image.new("RGB", size)
    ImageDraw.Draw(picture).line((0, 0, size[0], size[1]), fill="white", width=2)
    picture.save(path)
    return path


def test_generate_and_edit_take_controlnets_and_record_them(capsys, sd_folder, cn_folder, tmp_path):
    edges = edges_png(tmp_path / "edges.png")
    code, out, err = cli(capsys, "generate", PROMPT, "--model", sd_folder, "--controlnet", cn_folder, "--control", f"{edges}:0.6",
                         "--n", 1, "--steps", 2, "--precision", "fp32", "--out", tmp_path / "a.png")
    assert code == 0, err
    assert "resized to 16x16" in err  # a control image of another size: a note
    from diffusekit.images import read_parameters

    assert "Weight: 0.6" in read_parameters(tmp_path / "a.png")["ControlNet 0"]
    code, _, err = cli(capsys, "edit", tmp_path / "a.png", PROMPT, "--model", sd_folder, "--controlnet", cn_folder, "--control", edges,
                       "--steps", 2, "--precision", "fp32", "--out", tmp_path / "b.png")
    assert code == 0, err
    assert "Weight: 1, " in read_parameters(tmp_path / "b.png")["ControlNet 0"]
    code, _, err = cli(capsys, "generate", "--from", tmp_path / "a.png", "--model", sd_folder, "--out", tmp_path / "c.png")
    assert code == 0 and "made with a ControlNet" in err and "--controlnet and --control" in err


def test_the_cli_refuses_bad_controls_with_one_line(capsys, sd_folder, cn_folder, tmp_path):
    edges, junk = edges_png(tmp_path / "edges.png"), tmp_path / "junk.png"
    junk.write_text("not an image")
    out = tmp_path / "out.png"
    base = ["generate", PROMPT, "--model", sd_folder, "--steps", 2, "--out", out]
    assert_user_error(cli(capsys, *base, "--controlnet", cn_folder, "--control", f"{edges}:strong"), "'strong' is not a number", "edges.png:0.8")
    assert_user_error(cli(capsys, *base, "--control", edges), "needs a ControlNet", "--controlnet")
    assert_user_error(cli(capsys, *base, "--controlnet", cn_folder, "--control", junk), "junk.png", "not a PNG, JPEG or WebP")
    assert_user_error(cli(capsys, *base, "--controlnet", cn_folder), "1 ControlNet(s)", "--control IMAGE[:SCALE]")
    assert_user_error(cli(capsys, *base, "--controlnet", tmp_path, "--control", edges), "has no config.json")
    assert not out.exists()
