"""LoRA fine-tuning (finetune.py) and LoRAs in the pipeline: only the LoRA trains and really learns, the base
model's files and weights stay as they were, checkpoints hold the LoRA alone, a resume is bit-exact, prior
preservation draws its class images with the base model and weighs them as DreamBooth's eq. 2, and the
LoRA file a run writes loads in diffusekit and (for a diffusers base) in diffusers with the same outputs."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import max_diff, snapshot, tiny_config, write_images
from safetensors import safe_open

from diffusekit.diffusion_training import train
from diffusekit.errors import DiffusekitWarning, UserError
from diffusekit.files import read_tensors
from diffusekit.finetune import FinetuneRecipe, finetune, finetune_config
from diffusekit.losses import diffusion_loss
from diffusekit.nn.state import weights_fingerprint
from diffusekit.pipeline import Pipeline
from diffusekit.trainer import Trainer

LORA_KEY = re.compile(r"(unet|text_encoder)\..+\.lora_[AB]\.weight")


def squares(count: int, size: int = 8, seed: int = 0) -> np.ndarray:
    """A concept the base never saw: a bright square, a little jittered, on black."""
    rng, images = np.random.default_rng(seed), np.zeros((count, size, size), dtype=np.uint8)
    for image in images:
        x, y = rng.integers(1, 3, 2)
        image[y : y + 4, x : x + 4] = 255
    return images


@pytest.fixture(scope="module")
def new_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("new") / "squares"
    write_images(folder, squares(8))
    return folder


def tuned(base, data, run, *sets, resume=False):
    config = finetune_config(base, data, ["finetune.rank=4", "train.batch_size=8", "train.threads=1", "sample.steps=2", "sample.n=4", *sets])
    return finetune(config, run, resume=resume, progress=False)


def data_loss(net, pipe: Pipeline, images: torch.Tensor) -> float:
    """The diffusion loss on `images` at fixed timesteps and noise (8 draws per image)."""
    g = torch.Generator().manual_seed(0)
    x0 = images.repeat(8, 1, 1, 1)
    t = torch.randint(0, pipe.schedule.num_timesteps, (len(x0),), generator=g)
    with torch.no_grad():
        return diffusion_loss(net, pipe.schedule, x0, prediction=pipe.config.diffusion.prediction, sigma=pipe.schedule.t_to_sigma(t),
                              noise=torch.randn(x0.shape, generator=g)).item()


def test_only_the_lora_trains_it_learns_and_the_base_stays_as_it_was(trained_run, new_images, tmp_path):
    before = snapshot(trained_run)
    result = tuned(trained_run, new_images, tmp_path / "run", "train.max_steps=40", "train.lr=1e-2", "finetune.targets=attention,conv")
    assert snapshot(trained_run) == before  # the base's files, byte for byte
    ckpt = result.checkpoint
    assert {p.name for p in ckpt.iterdir()} == {"config.json", "state.json", "model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors"}
    weights = read_tensors(ckpt / "model.safetensors")
    assert weights and all(LORA_KEY.fullmatch(k) for k in weights)  # the LoRA alone, in the diffusers / peft names
    assert {p.name for p in (result.run_dir / "samples").glob("*.png")} == {"step_00000000.png", "step_00000040.png"}  # before and after

    pipe = Pipeline.from_pretrained(trained_run, device="cpu")
    base_weights, fingerprint = {k: v.clone() for k, v in pipe.net.state_dict().items()}, weights_fingerprint(pipe.net)
    images = torch.from_numpy(squares(8, seed=1)).float()[:, None] / 127.5 - 1
    base_loss = data_loss(pipe.net, pipe, images)
    assert pipe.load_lora(result.run_dir) == "lora"  # the run folder stands for its lora.safetensors
    tuned_loss = data_loss(pipe.net, pipe, images)
    assert tuned_loss < 0.5 * base_loss, (base_loss, tuned_loss)
    assert all(torch.equal(v, base_weights[k]) for k, v in pipe.net.state_dict().items()) and weights_fingerprint(pipe.net) == fingerprint
    assert snapshot(trained_run) == before
    with safe_open(str(result.run_dir / "lora.safetensors"), "pt") as f:
        header, saved = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert header["diffusekit.base_fingerprint"] == fingerprint and header["diffusekit.step"] == "40"
    ema = read_tensors(ckpt / "ema.safetensors")
    assert saved.keys() == ema.keys() and all(torch.equal(saved[k], ema[k]) for k in saved)  # the file is the EMA LoRA
    pipe.unload_lora()
    assert data_loss(pipe.net, pipe, images) == base_loss


def test_resume_is_bit_exact_with_lora_dropout_and_prior_images(trained_run, new_images, tmp_path):
    sets = ["finetune.dropout=0.2", "finetune.prior_images=4", "train.checkpoint_every=2", "train.lr=1e-2", "train.log_every=1"]  # dropout: global RNG
    straight = tuned(trained_run, new_images, tmp_path / "straight", "train.max_steps=4", *sets)
    tuned(trained_run, new_images, tmp_path / "split", "train.max_steps=2", *sets)
    resumed = tuned(trained_run, new_images, tmp_path / "split", "train.max_steps=4", *sets, resume=True)
    for name in ("model", "ema", "optimizer"):
        a, b = (read_tensors(r.checkpoint / f"{name}.safetensors") for r in (straight, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = (read_tensors(r.run_dir / "lora.safetensors") for r in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a) and any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    losses = [[json.loads(line)["loss"] for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()] for r in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_a_resume_needs_the_same_base(trained_run, new_images, tmp_path):
    tuned(trained_run, new_images, tmp_path / "run", "train.max_steps=1")
    other = tmp_path / "other"
    train(tiny_config(data__path=str(new_images), train__max_steps=1, train__seed=5), other, progress=False)
    with pytest.raises(UserError, match=r"is not the model .* was fine-tuned from .*fingerprints.*resume with that BASE"):
        tuned(other, new_images, tmp_path / "run", "train.max_steps=2", resume=True)


def test_prior_images_are_the_base_models_samples_weighted_as_dreambooth(trained_run, new_images, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSEKIT_CACHE", str(tmp_path / "cache"))
    config = finetune_config(trained_run, new_images, ["finetune.prior_images=3", "finetune.prior_weight=0.5", "finetune.prior_seed=7",
                                                       "sample.steps=3", "train.threads=1"])
    trainer = Trainer(config, tmp_path / "run", FinetuneRecipe, progress=False)
    expected = Pipeline.from_pretrained(trained_run, device="cpu").sample(3, seed=7, steps=3)
    drawn = trainer.dataset.images[8:].float() / 127.5 - 1
    assert len(trainer.dataset) == 11 and max_diff(drawn, expected) <= 1 / 127.5  # the base's own samples (as uint8)
    assert torch.equal(trainer.recipe.item_weights, torch.tensor([1.0] * 8 + [0.5 * 8 / 3] * 3))  # lambda N / N'
    assert len(list((tmp_path / "cache" / "prior").glob("*.safetensors"))) == 1  # drawn once, then cached
    # the weighted loss is the mean of w_i times each image's own loss (the same t and noise)
    x0, t, noise = torch.randn(3, 1, 8, 8), torch.tensor([5, 50, 90]), torch.randn(3, 1, 8, 8)
    weights, net, schedule = torch.tensor([1.0, 0.0, 2.0]), trainer.recipe.unet, trainer.recipe.schedule
    with torch.no_grad():
        sigma = schedule.t_to_sigma(t)
        each = [diffusion_loss(net, schedule, x0[i : i + 1], sigma=sigma[i : i + 1], noise=noise[i : i + 1]) for i in range(3)]
        weighted = diffusion_loss(net, schedule, x0, sigma=sigma, noise=noise, sample_weights=weights)
    assert torch.allclose(weighted, sum(w * e for w, e in zip(weights, each)) / 3)


@pytest.fixture(scope="module")
def text_base(tmp_path_factory):
    """A tiny text-to-image run (all-MiniLM-L6-v2) and a captioned folder of the new concept."""
    root = tmp_path_factory.mktemp("text")
    write_images(root / "old", squares(4, seed=3)[:, ::-1])
    (root / "old" / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"img_{i:03d}.png", "text": f"old {i}"}) + "\n" for i in range(4)))
    config = tiny_config(data__path=str(root / "old"), train__max_steps=1, text__encoder="minilm", model__cross_attention_dim=384, text__max_length=8)
    train(config, root / "run", progress=False)
    write_images(root / "new", squares(4))
    (root / "new" / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"img_{i:03d}.png", "text": f"a square {i}"}) + "\n" for i in range(4)))
    return root / "run", root / "new"


def test_a_text_encoder_lora_and_class_prompts(text_base, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSEKIT_CACHE", str(tmp_path / "cache"))
    base, data = text_base
    result = tuned(base, data, tmp_path / "run", "train.max_steps=3", "train.lr=1e-2", "finetune.text_encoder=true",
                   "finetune.prior_images=2", 'finetune.prior_prompts=["a class"]')
    saved = read_tensors(result.run_dir / "lora.safetensors")
    assert any(k.startswith("text_encoder.encoder.layer.0.attention.self.query.") for k in saved)  # BERT's attention names
    assert json.loads((result.run_dir / "samples" / "step_00000003.json").read_text())["prompts"] == [f"a square {i}" for i in range(4)]
    pipe = Pipeline.from_pretrained(base, device="cpu")
    hidden = pipe.text_encoder.encode(["a square 1"])[0]
    name = pipe.load_lora(result.run_dir)
    assert max_diff(pipe.text_encoder.encode(["a square 1"])[0], hidden) > 1e-4  # the text encoder's LoRA is loaded, and trained
    pipe.unload_lora(name)
    assert torch.equal(pipe.text_encoder.encode(["a square 1"])[0], hidden)


def test_lora_scales_in_the_pipeline(trained_run, new_images, tmp_path):
    result = tuned(trained_run, new_images, tmp_path / "run", "train.max_steps=3", "train.lr=1e-2")
    pipe = Pipeline.from_pretrained(trained_run, device="cpu")
    base = pipe.sample(2, steps=3)
    pipe.load_lora(result.run_dir, scale=0.0)
    assert torch.equal(pipe.sample(2, steps=3), base)
    pipe.set_lora_scales({"lora": 1.0})
    unfused = pipe.sample(2, steps=3)
    assert max_diff(unfused, base) > 1e-3
    pipe.fuse_lora()
    assert max_diff(pipe.sample(2, steps=3), unfused) <= 1e-4
    with pytest.raises(UserError, match="merged into the weights"):
        pipe.set_lora_scales({"lora": 0.5})
    pipe.unfuse_lora()  # the weights exactly as before
    with pytest.raises(UserError, match="no LoRA named 'style'.*loaded: lora"):
        pipe.set_lora_scales({"style": 1.0})
    with pytest.raises(UserError, match="finite number"):
        pipe.load_lora(result.run_dir, scale="strong")
    assert pipe.lora_names == ["lora"]
    pipe.unload_lora()
    assert torch.equal(pipe.sample(2, steps=3), base) and pipe.lora_names == []


def test_a_lora_of_another_base_with_the_same_shapes_warns(trained_run, new_images, tmp_path):
    result = tuned(trained_run, new_images, tmp_path / "run", "train.max_steps=1")
    pipe = Pipeline.from_pretrained(trained_run, weights="model", device="cpu")  # same shapes, other weights than the EMA it was tuned on
    with pytest.warns(DiffusekitWarning, match="fine-tuned from another base model"):
        pipe.load_lora(result.run_dir)


def test_a_lora_fine_tuned_from_a_diffusers_folder_loads_in_diffusers_with_the_same_outputs(sd_folder, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from test_lora import plain_peft_adapters

    rng = np.random.default_rng(0)
    write_images(tmp_path / "data", rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    (tmp_path / "data" / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"img_{i:03d}.png", "text": "red"}) + "\n" for i in range(4)))
    before = snapshot(sd_folder)
    result = tuned(sd_folder, tmp_path / "data", tmp_path / "run", "train.max_steps=3", "train.lr=5e-2", "train.batch_size=4")
    assert snapshot(sd_folder) == before
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder)
    plain_peft_adapters(theirs.text_encoder)
    theirs.load_lora_weights(result.run_dir / "lora.safetensors")
    ours = Pipeline.from_pretrained(sd_folder, device="cpu")
    x, t, context = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10.0, 700.0]), torch.randn(2, 5, 32)
    with torch.no_grad():
        base_ours = ours.net(x, t, context=context)
        ours.load_lora(result.run_dir)
        mine, reference = ours.net(x, t, context=context), theirs.unet(x, t, encoder_hidden_states=context).sample
    assert max_diff(mine, reference) <= 1e-4 and max_diff(mine, base_ours) > 1e-4  # the same outputs, and it learnt something


def test_a_failed_save_keeps_the_last_checkpoint_and_its_lora_file(trained_run, new_images, tmp_path, monkeypatch):
    from test_crash import disk_full_at

    disk_full_at(monkeypatch, 4)
    with pytest.warns(DiffusekitWarning, match="could not write a checkpoint: step 4"):
        result = tuned(trained_run, new_images, tmp_path / "run", "train.max_steps=6", "train.checkpoint_every=2")
    assert sorted(p.name for p in (result.run_dir / "checkpoints").iterdir()) == ["latest", "step_00000002", "step_00000006"]
    with safe_open(str(result.run_dir / "lora.safetensors"), "pt") as f:
        assert f.metadata()["diffusekit.step"] == "6"
