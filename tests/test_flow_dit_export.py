"""Export of flow models and DiTs to diffusers (io/diffusers_export.py): what diffusers loads samples or
computes the same, and what it cannot express is one clear error."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

diffusers = pytest.importorskip("diffusers")

from test_diffusers_io import TOL, max_diff, perturb, sample_ddpm_pipeline, save_run  # noqa: E402
from test_flow_dit_training import DIT, FLOW  # noqa: E402
from test_latent import TINY_VAE  # noqa: E402

from diffusekit.errors import UserError  # noqa: E402
from diffusekit.io.diffusers_export import export_diffusers  # noqa: E402
from diffusekit.models import build_net  # noqa: E402
from diffusekit.pipeline import Pipeline  # noqa: E402


def exported(tmp_path, sets: dict, seed: int = 7, components=None):
    config = tiny_config(**sets)
    torch.manual_seed(0)
    net = perturb(build_net(config), seed)
    run = save_run(tmp_path / "run", config, net)
    notes = export_diffusers(run, tmp_path / "export", components=components)
    return run, net, notes


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_a_flow_unet_is_a_ddpm_pipeline_with_a_flow_match_scheduler_that_samples_the_same(tmp_path, shift):
    run, net, notes = exported(tmp_path, {**FLOW, "diffusion__shift": shift})
    assert notes == []
    theirs = diffusers.DDPMPipeline.from_pretrained(tmp_path / "export")
    assert type(theirs.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and theirs.scheduler.config.shift == shift
    noise, expected = sample_ddpm_pipeline(theirs, 2, steps=6, seed=1)
    assert ((expected > 0.01) & (expected < 0.99)).float().mean() > 0.5
    ours = Pipeline.from_pretrained(run, device="cpu").sample(2, steps=6, sampler="flow_euler", spacing="linspace", noise=noise)
    assert max_diff((ours + 1) / 2, expected) <= TOL
    back = Pipeline.from_pretrained(tmp_path / "export", device="cpu")  # and back: the same process and sampler
    d = back.config.diffusion
    assert (d.process, d.prediction, d.shift, back.config.sample.sampler, back.config.sample.spacing) == ("flow", "v", shift, "flow_euler", "linspace")
    assert max_diff(back.sample(2, steps=6, noise=noise), ours) == 0


def test_flow_heun_exports_as_flow_match_heun(tmp_path):
    exported(tmp_path, {**FLOW, "sample__sampler": "flow_heun"})
    scheduler = diffusers.FlowMatchHeunDiscreteScheduler.from_pretrained(tmp_path / "export" / "scheduler")
    assert scheduler.config.num_train_timesteps == 100 and Pipeline.from_pretrained(tmp_path / "export").config.sample.sampler == "flow_heun"


@pytest.mark.parametrize("classes", [0, 3])
def test_a_dit_exports_as_a_dit_transformer_2d_model(tmp_path, classes, capsys):
    with pytest.raises(UserError, match=r"DiTPipeline is ImageNet's.*--components transformer,scheduler"):
        exported(tmp_path, {**DIT, "model__num_classes": classes})
    run, net, notes = exported(tmp_path, {**DIT, "model__num_classes": classes}, components=["transformer", "scheduler"])
    assert "class_labels" in notes[0]
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "export" / "transformer").eval()
    assert theirs.config.num_embeds_ada_norm == (classes or 1) and theirs.config.num_layers == 2 and theirs.config.attention_head_dim == 16
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([3.0, 40.0, 99.0])
    with torch.no_grad():
        if classes:
            labels = torch.tensor([0, 2, 3])  # 3: the null class, at the same index in both
            expected, got = theirs(x, t, class_labels=labels).sample, net(x, t, class_labels=labels)
        else:
            expected, got = theirs(x, t, class_labels=torch.tensor([0, 1, 0])).sample, net(x, t)  # zero class tables: any label
    assert got.abs().max() > 0.1 and max_diff(got, expected) <= TOL
    assert diffusers.DDIMScheduler.from_pretrained(tmp_path / "export" / "scheduler").config.num_train_timesteps == 100


@pytest.mark.parametrize("sets, message", [
    ({"model__pos_embed": "learned"}, "position embeddings are learned"),
    ({"model__mlp_ratio": 2}, "model.mlp_ratio = 2"),
])
def test_what_diffusers_dit_cannot_express_is_refused(tmp_path, sets, message):
    with pytest.raises(UserError, match=f"cannot be exported to diffusers: .*{message}"):
        exported(tmp_path, {**DIT, **sets}, components=["transformer"])


def test_a_text_conditioned_dit_is_not_exportable(tmp_path):
    text = {"text__encoder": "minilm", "model__cross_attention_dim": 384}
    with pytest.raises(UserError, match="it is text-conditioned, and diffusers' DiTTransformer2DModel has no cross-attention"):
        exported(tmp_path, {**DIT, **text}, components=["transformer"])


def test_a_flow_text_to_image_model_is_not_a_stable_diffusion_pipeline(monkeypatch):
    from diffusekit.io import diffusers_export

    monkeypatch.setattr(diffusers_export, "text_model_type", lambda encoder: "clip_text_model")
    config = tiny_config(**FLOW, text__encoder="clip-folder", text__mask_padding=False, model__cross_attention_dim=32, latent__vae="vae-run",
                         **{f"vae__{k}": v for k, v in TINY_VAE.items()})
    assert diffusers_export.pipeline_class(config)[1].startswith("StableDiffusionPipeline cannot run a flow-matching scheduler")
    ddpm = tiny_config(text__encoder="clip-folder", text__mask_padding=False, model__cross_attention_dim=32, latent__vae="vae-run",
                       **{f"vae__{k}": v for k, v in TINY_VAE.items()})
    assert diffusers_export.pipeline_class(ddpm) == ("StableDiffusionPipeline", "")
