"""LoRA (Hu et al. 2021, eq. 3: h = W0 x + (alpha / r) B A x): the layer module, and LoRA files
checked against diffusers + peft on a tiny random Stable Diffusion pipeline (those tests are
skipped without diffusers and peft; the layer tests need neither).

peft makes a random LoRA (random A and B, alpha != r) on the diffusers U-Net and CLIP text encoder;
diffusers saves it (save_lora_weights, with its adapter metadata) and loads it back into a fresh
pipeline (load_lora_weights, then fuse_lora); diffusekit loads the same file, a kohya file made
from the same tensors, and one with the original LDM U-Net names, and must give the same outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import PROMPT, initial_latents, max_diff, run_diffusers, sd_scheduler
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from diffusekit.errors import UserError
from diffusekit.io.lora import load_lora, parse_lora_spec, save_lora
from diffusekit.io.lora_keys import kohya_table
from diffusekit.nn import lora
from diffusekit.nn.unet import UNet
from diffusekit.pipeline import Pipeline

TOL = 1e-4
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"]  # attention, a 1x1 conv, feed-forward, a 3x3 conv (LoCon)
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
ALPHAS = {"unet": 8.0, "text_encoder": 1.0}  # ranks 4 and 2: scales 2 and 0.5


def tiny_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(4, 4, channels=(16, 32), attention_levels=(0,), cross_attention_dim=32, attention_heads=2, norm_groups=8).eval()


def unet_inputs(n: int = 2):
    g = torch.Generator().manual_seed(11)
    return torch.randn(n, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0])[:n], torch.randn(n, 7, 32, generator=g)


def randomize(loras, seed: int, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for x in loras:
            x.down.normal_(0, std, generator=g)
            x.up.normal_(0, std, generator=g)


# ----------------------------------------------------------------------------- the layer module


def test_merge_then_unmerge_gives_back_the_weights_and_merged_equals_unmerged():
    net = tiny_unet()
    x, t, ctx = unet_inputs()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        base = net(x, t, context=ctx)
    randomize(lora.inject_lora(net, "a", 4, 8, targets=("attention", "ff", "proj", "conv")).values(), 1)
    lora.set_scales(net, {"a": 0.7})
    with torch.no_grad():
        unmerged = net(x, t, context=ctx)
        lora.merge(net)
        merged = net(x, t, context=ctx)
    assert max_diff(merged, unmerged) <= 1e-5 and max_diff(unmerged, base) > 1e-2
    assert max(max_diff(net.state_dict()[k], before[k]) for k in before) > 1e-2  # merging changed the weights ...
    with pytest.raises(UserError, match="unmerge"):
        lora.set_scales(net, {"a": 0.5})
    lora.unmerge(net)
    assert all(torch.equal(net.state_dict()[k], before[k]) for k in before)  # ... and unmerging undid it exactly (merge kept W0)
    lora.merge(net, keep_original=False)
    lora.unmerge(net)  # without the copy: W - delta
    assert max(max_diff(net.state_dict()[k], before[k]) for k in before) <= 1e-6


def test_several_loras_on_one_layer_add_their_own_scaled_deltas():
    layer, x = nn.Linear(6, 5).requires_grad_(False), torch.randn(3, 6)
    a, b = lora.add_lora(layer, "a", 2, alpha=4).requires_grad_(False), lora.add_lora(layer, "b", 3).requires_grad_(False)
    randomize([a, b], 2)
    lora.set_scales(layer, {"a": 0.8, "b": -0.5})
    expected = x @ layer.weight.T + layer.bias + 0.8 * (4 / 2) * x @ (a.up @ a.down).T - 0.5 * (3 / 3) * x @ (b.up @ b.down).T
    assert max_diff(layer(x), expected) <= 1e-5
    lora.set_scales(layer, {"a": 0.0})
    assert max_diff(layer(x), x @ layer.weight.T + layer.bias - 0.5 * x @ (b.up @ b.down).T) <= 1e-5
    with pytest.raises(UserError, match="finite number"):
        lora.set_scales(layer, {"b": "0.5"})


def test_injection_keeps_the_base_state_dict_and_a_new_lora_changes_nothing():
    net, x, t, ctx = tiny_unet(), *unet_inputs()
    run = torch.no_grad()(lambda: net(x, t, context=ctx))
    keys, out = list(net.state_dict()), run()
    injected = lora.inject_lora(net, "a", 4)
    assert len(injected) == 4 * 2 * 4  # q, k, v, out of attn1 and attn2 in 4 transformers (down 1, mid 1, up 2)
    assert all(path.endswith(("to_q", "to_k", "to_v", "to_out.0")) for path in injected)
    assert list(net.state_dict()) == keys
    net.load_state_dict(tiny_unet(1).state_dict())  # strict: a base checkpoint still loads
    net.load_state_dict(tiny_unet(0).state_dict())
    assert max_diff(run(), out) == 0  # B = 0 at the start
    down = injected["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"].down
    assert down.shape == (4, 32) and down.std() > 0 and down.abs().max() <= 1 / 32**0.5  # Kaiming-uniform, a = sqrt(5)
    assert len(lora.lora_parameters(net)) == 2 * len(injected) and all(p.requires_grad for p in lora.lora_parameters(net))
    assert set(lora.lora_state_dict(net, "a")) == {f"{p}.lora_{m}.weight" for p in injected for m in "AB"}
    lora.remove_lora(net)
    assert lora.adapter_names(net) == [] and not hasattr(net.mid_block.attentions[0].proj_in, "lora")


def test_a_conv_lora_is_a_down_conv_with_the_base_kernel_and_a_1x1_up_conv():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1).requires_grad_(False)
    x = lora.add_lora(conv, "a", 2, alpha=1).requires_grad_(False)
    assert (x.down.shape, x.up.shape) == ((2, 3, 3, 3), (5, 2, 1, 1))
    randomize([x], 3)
    inp = torch.randn(1, 3, 8, 8)
    expected = nn.functional.conv2d(inp, conv.weight + x.delta(), conv.bias, stride=2, padding=1)
    assert max_diff(conv(inp), expected) <= 1e-5


def test_wrong_targets_names_and_ranks_are_user_errors():
    with pytest.raises(UserError, match="this model has no attention layers to fine-tune"):
        lora.inject_lora(nn.Sequential(nn.Conv2d(3, 3, 3)), "a", 4)
    net = tiny_unet()
    lora.inject_lora(net, "a", 4)
    with pytest.raises(UserError, match="already loaded"):
        lora.inject_lora(net, "a", 4)
    with pytest.raises(UserError, match="rank"):
        lora.inject_lora(net, "b", 0)
    mixed = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(UserError, match="groups = 1"):
        lora.inject_lora(mixed, "b", 2, targets=("0", "1"))
    assert lora.adapter_names(net) == ["a"] and lora.adapter_names(mixed) == [] and not hasattr(mixed[0], "lora")  # all or nothing
    with pytest.raises(UserError, match="no LoRA named 'c'.*loaded: a"):
        lora.set_scales(net, {"c": 1.0})


# ----------------------------------------------------------------------------- files, against diffusers + peft


@pytest.fixture(scope="module")
def peft_file(sd_folder, tmp_path_factory):
    """A random peft LoRA on the tiny pipeline's U-Net (r 4, alpha 8) and CLIP (r 2, alpha 1), saved by diffusers."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder)
    torch.manual_seed(4)
    unet_config = LoraConfig(r=4, lora_alpha=ALPHAS["unet"], target_modules=UNET_TARGETS, init_lora_weights=False)
    text_config = LoraConfig(r=2, lora_alpha=ALPHAS["text_encoder"], target_modules=TEXT_TARGETS, init_lora_weights=False)
    pipe.unet.add_adapter(unet_config)
    inject_adapter_in_model(text_config, pipe.text_encoder)  # what text_encoder.add_adapter does (see plain_peft_adapters)
    folder = tmp_path_factory.mktemp("lora")
    diffusers.StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet), text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict(), weight_name="style.safetensors",
    )
    return folder / "style.safetensors"


def outputs(unet_fn, text_fn):
    """(U-Net output, text hidden states) of one implementation on fixed inputs."""
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        return unet_fn(x, t, ctx), text_fn()


def plain_peft_adapters(text_encoder) -> None:
    """transformers' adapter methods refuse peft < 0.22.0, which PyPI does not have; diffusers' text-encoder
    loading calls text_encoder.load_adapter, so it gets what that method does, with peft itself."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    def load_adapter(adapter_name, adapter_state_dict, peft_config, **kwargs):
        inject_adapter_in_model(peft_config, text_encoder, adapter_name=adapter_name)
        set_peft_model_state_dict(text_encoder, adapter_state_dict, adapter_name=adapter_name)

    text_encoder.load_adapter = load_adapter


def theirs(sd_folder, lora_file=None, fuse=False):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder)
    plain_peft_adapters(pipe.text_encoder)
    if lora_file is not None:
        pipe.load_lora_weights(lora_file)
        if fuse:
            pipe.fuse_lora()
    return pipe, outputs(lambda x, t, c: pipe.unet(x, t, encoder_hidden_states=c).sample, lambda: pipe.encode_prompt([PROMPT], "cpu", 1, False)[0])


def ours(sd_folder, lora_file=None, **kwargs):
    pipe = Pipeline.from_pretrained(sd_folder, device="cpu")
    name = load_lora(lora_file, pipe.net, text_encoder=pipe.text_encoder, **kwargs) if lora_file else None
    return pipe, name, outputs(lambda x, t, c: pipe.net(x, t, context=c), lambda: pipe.text_encoder.encode([PROMPT])[0])


def assert_same(a, b, tol=TOL):
    assert max_diff(a[0], b[0]) <= tol and max_diff(a[1], b[1]) <= tol, (max_diff(a[0], b[0]), max_diff(a[1], b[1]))


@pytest.fixture(scope="module")
def expected(sd_folder, peft_file):
    """diffusers' outputs with the LoRA loaded; they differ clearly from the base model's."""
    _, base = theirs(sd_folder)
    _, with_lora = theirs(sd_folder, peft_file)
    assert max_diff(with_lora[0], base[0]) > 0.05 and max_diff(with_lora[1], base[1]) > 0.05
    return with_lora


def test_a_diffusers_lora_file_gives_diffusers_outputs_and_leaves_the_base_weights(sd_folder, peft_file, expected):
    _, fused = theirs(sd_folder, peft_file, fuse=True)
    assert_same(fused, expected)
    pipe = Pipeline.from_pretrained(sd_folder, device="cpu")
    base = {k: v.clone() for k, v in pipe.net.state_dict().items()}
    assert load_lora(peft_file, pipe.net, text_encoder=pipe.text_encoder) == "style"
    assert {k: v for k, v in pipe.net.state_dict().items()}.keys() == base.keys()
    assert all(torch.equal(v, base[k]) for k, v in pipe.net.state_dict().items())  # loading touches no base weight
    got = outputs(lambda x, t, c: pipe.net(x, t, context=c), lambda: pipe.text_encoder.encode([PROMPT])[0])
    assert_same(got, expected)
    lora.merge(pipe.net)
    lora.merge(pipe.text_encoder.model)
    assert_same(outputs(lambda x, t, c: pipe.net(x, t, context=c), lambda: pipe.text_encoder.encode([PROMPT])[0]), fused)


def with_header(lora_file, out, change):
    """A copy of the file with its diffusers adapter metadata changed (None: without it)."""
    with safe_open(str(lora_file), "pt") as f:
        tensors, config = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["lora_adapter_metadata"])
    config = change(config)
    save_file(tensors, out, metadata={"format": "pt"} | ({"lora_adapter_metadata": json.dumps(config)} if config else {}))
    return out


@pytest.mark.parametrize("change", [lambda c: None, lambda c: c | {"unet.use_rslora": True, "text_encoder.use_rslora": True}], ids=["no metadata: alpha = r", "rsLoRA: alpha / sqrt(r)"])
def test_the_header_decides_alpha_as_in_diffusers(sd_folder, peft_file, expected, tmp_path, change):
    path = with_header(peft_file, tmp_path / "header.safetensors", change)
    _, reference = theirs(sd_folder, path)
    assert max_diff(reference[0], expected[0]) > 0.01  # the header matters ...
    assert_same(ours(sd_folder, path)[2], reference)  # ... and is read the same way


def to_kohya(lora_file, out, ldm_names: dict[str, str] | None = None):
    """The same tensors as kohya writes them: '.' flattened to '_', lora_down / lora_up / alpha; with `ldm_names`
    ({diffusers block: LDM block}) in the original U-Net's names, a ResBlock's conv1 being in_layers.2 there."""
    tensors, kohya = load_file(lora_file), {}
    for key, value in tensors.items():
        part, path = key.split(".", 1)
        path, matrix = path.rsplit(".lora_", 1)
        for block, ldm_block in (ldm_names or {}).items():
            if path.startswith(block + "."):
                rest = path[len(block) + 1 :]
                path = f"{ldm_block}.{'in_layers.2' if rest == 'conv1' else rest}"
        name = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[part] + path.replace(".", "_")
        kohya[f"{name}.lora_{'down' if matrix == 'A.weight' else 'up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(ALPHAS[part])
    save_file(kohya, out)
    return out


# the tiny U-Net (levels 16 with attention, 32 without; one ResBlock a level) in LDM names, written out by hand
TINY_LDM = {"down_blocks.0.resnets.0": "input_blocks.1.0", "down_blocks.0.attentions.0": "input_blocks.1.1", "down_blocks.1.resnets.0": "input_blocks.3.0",
            "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1", "mid_block.resnets.1": "middle_block.2",
            "up_blocks.0.resnets.0": "output_blocks.0.0", "up_blocks.0.resnets.1": "output_blocks.1.0", "up_blocks.1.resnets.0": "output_blocks.2.0",
            "up_blocks.1.attentions.0": "output_blocks.2.1", "up_blocks.1.resnets.1": "output_blocks.3.0", "up_blocks.1.attentions.1": "output_blocks.3.1"}


def test_kohya_files_with_diffusers_or_ldm_names_give_the_same_outputs(sd_folder, peft_file, expected, tmp_path):
    kohya = to_kohya(peft_file, tmp_path / "kohya.safetensors")
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.") for k in load_file(kohya))
    assert_same(ours(sd_folder, kohya)[2], expected)
    assert_same(theirs(sd_folder, kohya)[1], expected)  # diffusers reads the kohya file the same way
    ldm = to_kohya(peft_file, tmp_path / "ldm.safetensors", TINY_LDM)
    names = {k.split(".")[0] for k in load_file(ldm)}
    assert {"lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_k", "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_middle_block_1_proj_in"} <= names
    assert not any("down_blocks" in n or "up_blocks" in n or "mid_block" in n for n in names)
    assert_same(ours(sd_folder, ldm)[2], expected)


def test_stable_diffusion_1_5_ldm_names_map_to_diffusers_names():
    sd15 = UNet(4, 4, channels=(8, 16, 32, 32), layers_per_block=2, attention_levels=(0, 1, 2), cross_attention_dim=8, attention_heads=1, norm_groups=4)
    table = kohya_table(sd15, "lora_unet")
    known = {  # from diffusers' convert_original_stable_diffusion_to_diffusers.py for SD 1.x
        "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks_8_1_proj_in": "down_blocks.2.attentions.1.proj_in",
        "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks_11_0_out_layers_3": "down_blocks.3.resnets.1.conv2",
        "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
        "middle_block_1_transformer_blocks_0_ff_net_2": "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
        "middle_block_2_emb_layers_1": "mid_block.resnets.1.time_emb_proj",
        "output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
        "output_blocks_3_1_transformer_blocks_0_attn2_to_out_0": "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
        "output_blocks_11_1_proj_out": "up_blocks.3.attentions.2.proj_out",
        "output_blocks_11_0_in_layers_2": "up_blocks.3.resnets.2.conv1",
        "input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding.linear_1",
        "up_blocks_3_attentions_2_proj_out": "up_blocks.3.attentions.2.proj_out",
    }
    assert {name: table.get("lora_unet_" + name) for name in known} == known


def test_a_lora_diffusekit_saves_loads_in_diffusers_with_the_same_outputs(sd_folder, tmp_path):
    pipe, _, base = ours(sd_folder)
    mine = lora.inject_lora(pipe.net, "mine", 4, alpha=2, targets=("attention", "conv"))
    conv1 = dict(pipe.net.named_modules())["up_blocks.1.resnets.0.conv1"]
    lora.remove_lora(conv1, "mine")
    mine["up_blocks.1.resnets.0.conv1"] = lora.add_lora(conv1, "mine", 2, alpha=3)  # its own rank and alpha: rank_pattern, alpha_pattern
    text = lora.inject_lora(pipe.text_encoder.model, "mine", 2, alpha=4)
    randomize([*mine.values(), *text.values()], 5, std=0.1)
    got = outputs(lambda x, t, c: pipe.net(x, t, context=c), lambda: pipe.text_encoder.encode([PROMPT])[0])
    assert max_diff(got[0], base[0]) > 0.05 and max_diff(got[1], base[1]) > 0.05
    path = save_lora(tmp_path / "mine.safetensors", pipe.net, "mine", text_encoder=pipe.text_encoder, metadata={"trained_on": "tests"})
    assert_same(theirs(sd_folder, path)[1], got)
    assert_same(ours(sd_folder, path)[2], got)  # and back


def test_sampling_with_a_lora_matches_stable_diffusion_pipeline(sd_folder, peft_file):
    pipe, _ = theirs(sd_folder, peft_file)
    latents = initial_latents(2)
    reference = run_diffusers(pipe, sd_scheduler(set_alpha_to_one=True), latents, steps=4, guidance=3.0)
    mine, _, _ = ours(sd_folder, peft_file)
    images = mine.sample(2, steps=4, sampler="ddim", prompts=PROMPT, guidance=3.0, noise=latents)
    assert max_diff((images + 1) / 2, reference) <= TOL


def edited(peft_file, tmp_path, change) -> str:
    tensors = load_file(peft_file)
    change(tensors)
    save_file(tensors, tmp_path / "bad.safetensors")
    return tmp_path / "bad.safetensors"


Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
CASES = [
    (lambda t: t.__setitem__(Q, torch.zeros(4, 99)), r"bad.safetensors: '.*attn1.to_q.lora_A.weight' has shape \(4, 99\) but the layer .* needs \(4, 16\).*another base model"),
    (lambda t: t.__setitem__(Q.replace("down_blocks.0", "down_blocks.7"), torch.zeros(4, 16)), r"cannot place the key 'unet.down_blocks.7.*down_blocks has no '7"),
    (lambda t: t.__setitem__("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn9_to_q.alpha", torch.tensor(1.0)),
     r"cannot place the key 'lora_unet_.*attn9.*down_blocks.0.attentions.0.transformer_blocks.0 has no 'attn9_to_q'"),
    (lambda t: t.__setitem__("unet.some.hada_w1_a", torch.zeros(1)), "neither a diffusers/peft key"),
    (lambda t: t.pop(Q.replace("lora_A", "lora_B")), "only one of its two LoRA matrices"),
    (lambda t: t.__setitem__("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight", t[Q].clone()), "both hold the down of the layer"),
]


@pytest.mark.parametrize("change, message", CASES, ids=["shape", "unknown path", "unknown kohya name", "not a lora key", "half a pair", "one layer twice"])
def test_a_lora_that_does_not_fit_is_one_user_error_and_changes_nothing(sd_folder, peft_file, tmp_path, change, message):
    pipe = Pipeline.from_pretrained(sd_folder, device="cpu")
    with pytest.raises(UserError, match=message):
        load_lora(edited(peft_file, tmp_path, change), pipe.net, text_encoder=pipe.text_encoder)
    assert lora.adapter_names(pipe.net) == [] and lora.adapter_names(pipe.text_encoder.model) == []


def test_scales_files_and_specs_are_checked(sd_folder, peft_file, tmp_path):
    net = Pipeline.from_pretrained(sd_folder, device="cpu").net
    with pytest.raises(UserError, match="finite number"):
        load_lora(peft_file, net, scale="strong")
    with pytest.raises(UserError, match="safetensors only"):
        load_lora(tmp_path / "style.bin", net)
    with pytest.raises(UserError, match="does not exist"):
        load_lora(tmp_path / "missing.safetensors", net)
    assert load_lora(peft_file, net, scale=0.5) == "style" and load_lora(peft_file, net) == "style_2"  # a free name; the U-Net part only
    assert parse_lora_spec("style.safetensors:0.8") == (Path("style.safetensors"), 0.8)
    assert parse_lora_spec("style.safetensors") == (Path("style.safetensors"), 1.0)
    assert parse_lora_spec("a:b/style.safetensors:-1") == (Path("a:b/style.safetensors"), -1.0)  # the last ':' counts
    odd = tmp_path / "with:colon"
    odd.write_bytes(b"")
    assert parse_lora_spec(str(odd)) == (odd, 1.0)  # an existing file is taken whole
    for bad in ["style.safetensors:strong", "style.safetensors:nan", "a:b/style.safetensors", ":0.5", ""]:  # a missing file with ':'
        with pytest.raises(UserError, match="FILE:SCALE|FILE or FILE:SCALE"):
            parse_lora_spec(bad)
