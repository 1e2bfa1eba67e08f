"""LoRA fine-tuning: a trained model learns a handful of new images in minutes, and only low-rank
updates of its layers train (Hu et al. 2021: h = W0 x + (alpha / r) B A x, nn/lora.py).

    config = finetune_config("runs/emoji-ldm", "my_images/", ["finetune.rank=8", 'train.budget="10m"'])
    result = finetune(config, "runs/mine")       # then Pipeline.from_pretrained(BASE).load_lora("runs/mine")

The base model (a diffusekit run or checkpoint, a diffusers folder, or the shipped demo model) is loaded
and frozen, LoRAs go on its attention layers (or other targets), and the same diffusion loss as `train`
trains their A and B alone (FinetuneRecipe: its data and networks here, its step diffusion_training.diffusion_step).
What trains (the trainer's `net`) is the LoRA's tensors as one module (nn.lora.LoRAWeights), and a step runs
the base U-Net they sit on, so the optimizer, the EMA and every checkpoint hold the LoRA and nothing of the base
(a checkpoint is a few MB), and a resume continues bit for bit as in `train`. The base weights are never
written; a resume checks (by the weights' fingerprint) that BASE is the model the run started from.

Prior preservation (DreamBooth, Ruiz et al. 2023, eq. 2), against forgetting what the base could draw:

    E || x^(a x + s eps, c) - x ||^2  +  lambda E || x^(a x' + s eps', c_pr) - x' ||^2

with class images x' that the base model generates from class prompts c_pr before training (cached) or
that a folder gives. Both sets go into one batch stream; a class image's term is weighted
lambda N / N' (N new images, N' class images), so that the mean over the data is N / (N + N') times
the objective above.

RUN/samples/step_00000000.png shows the base model on the grid prompts (a new LoRA changes nothing),
the last grid the result; RUN/lora.safetensors, the EMA LoRA in the diffusers / peft layout with the
base's fingerprint in its header, is rewritten with every checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors import SafetensorError

from diffusekit.config import Config, EvalConfig, FinetuneConfig, TrainConfig, apply_overrides
from diffusekit.data import ImageDataset, load_dataset, to_uint8
from diffusekit.data.folder import describe_captions, load_folder, read_captions
from diffusekit.data.latents import latent_dataset
from diffusekit.devices import prepare_module
from diffusekit.diffusion_batches import DiffusionBatches
from diffusekit.diffusion_training import diffusion_step
from diffusekit.errors import UserError, warn
from diffusekit.files import cache_dir, read_cached_tensors, save_tensors_atomic
from diffusekit.io import diffusers, single_file
from diffusekit.io.checkpoint import latest_checkpoint, load_config, resolve_checkpoint
from diffusekit.io.lora import BASE_FINGERPRINT, BASE_NAME, RUN_FILE, save_lora, text_model
from diffusekit.layout import choose_layout
from diffusekit.models import default_model, example_inputs
from diffusekit.nn.lora import LoRAWeights, inject_lora
from diffusekit.nn.state import weights_fingerprint
from diffusekit.pipeline import Pipeline, load_model
from diffusekit.schedule import make_schedule
from diffusekit.trainer import Recipe, Trained, TrainResult, run_training
from diffusekit.training_state import save_output

ADAPTER = "finetune"  # the name of the LoRA being trained
DEMO = "the shipped demo model"
# training defaults of a fine-tuning run (the base's own train.* are for training from scratch)
FINETUNE_TRAIN = dict(batch_size=16, lr=1e-3, warmup_steps=10, ema_decay=0.99, max_steps=1000, log_every=10, checkpoint_every=100)
GRID_IMAGES = 16


def base_path(base: str | Path | None) -> Path:
    return Path(base) if base else default_model()


def base_config(base: str | Path | None) -> Config:
    """The base model's config, read without its weights."""
    path = base_path(base)
    if single_file.is_single_file(path):  # a Stable Diffusion single file: its shape is read from its weights
        return single_file.read_config_and_weights(path)[0]
    if diffusers.is_diffusers_folder(path):
        return diffusers.read_config(diffusers.find_parts(path))
    config = load_config(resolve_checkpoint(path))
    if config.task != "diffusion":
        what = "a LoRA fine-tuning run: fine-tune its base model instead" if config.task == "finetune" else "an autoencoder (train-vae)"
        raise UserError(f"'{path}' is {what}; give a diffusion model as BASE")
    return config


def finetune_config(base: str | Path | None, data: str | Path, overrides=(), values: dict | None = None) -> Config:
    """A fine-tuning run's config: the base model's networks, diffusion and sampling settings, the image folder
    `data` (captions as `train` reads them), fine-tuning's training defaults, then the `--set` overrides and the
    command's own flags (`values`, config.apply_overrides)."""
    config = base_config(base)
    if config.model.num_classes:
        raise UserError(f"'{base_path(base)}' is class-conditional, and an image folder has no class labels; "
                        "fine-tune a text-to-image or an unconditional model")
    config = replace(
        config, task="finetune", description=f"LoRA fine-tuning of {base or DEMO} on {data}",
        data=replace(config.data, dataset="folder", path=str(data), limit=0, hflip=False),
        train=replace(TrainConfig(), **FINETUNE_TRAIN), sample=replace(config.sample, n=GRID_IMAGES), eval=EvalConfig(),
        finetune=FinetuneConfig(base=str(base or "")),
    )
    return apply_overrides(config, list(overrides), values)


def finetune(config: Config, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Fine-tune into `run_dir` (a new run, or --resume the run there) with a config from finetune_config."""
    if config.task != "finetune":
        raise UserError("this is not a fine-tuning config: make one with finetune_config(BASE, DATA)")
    saved = latest_checkpoint(Path(run_dir)) if resume else None
    if saved is not None:  # another BASE than the run's would clash in its model: say so first
        was = load_config(saved)
        if was.finetune.base != config.finetune.base and (was.model, was.diffusion, was.text) != (config.model, config.diffusion, config.text):
            raise UserError(f"'{base_path(config.finetune.base)}' is not the model '{run_dir}' was fine-tuned from "
                            f"({was.finetune.base or DEMO}): resume with that BASE")
    return run_training(FinetuneRecipe, config, run_dir, resume=resume, overwrite=overwrite, progress=progress)


VERBS = {"finetune": "fine-tuned from", "controlnet": "made for"}


def check_base(trainer, section: str, fingerprint: str) -> None:
    """On resume BASE must be the model the run started from; the fingerprint goes into the run's config (its
    `section`: finetune, controlnet), as the base's U-Net fingerprint."""
    fc = getattr(trainer.config, section)
    if trainer.resume_from is not None:
        saved = getattr(load_config(trainer.resume_from), section)
        if saved.base_fingerprint != fingerprint:
            raise UserError(
                f"'{base_path(fc.base)}' is not the model '{trainer.run_dir}' was {VERBS[section]} ({saved.base or DEMO}; U-Net "
                f"fingerprints {fingerprint[:12]} and {saved.base_fingerprint[:12]}): resume with that BASE"
            )
    trainer.config = replace(trainer.config, **{section: replace(fc, base_fingerprint=fingerprint)})  # the run's config records it


def join(a: ImageDataset, b: ImageDataset) -> ImageDataset:
    captions = a.captions + b.captions if a.captions is not None and b.captions is not None else None
    return ImageDataset(torch.cat([a.images, b.images]), captions=captions)


class FinetuneRecipe(Recipe):
    """LoRAs on a frozen base model learn the new images (and the class images) with the diffusion loss."""

    single_process_reason = "LoRA fine-tuning runs in one process"

    # ------------------------------------------------------------------ data: the new images (+ class images)

    def load_data(self):
        t = self.trainer
        fc = t.config.finetune
        self.base = load_model(base_path(fc.base))
        self.check_base(weights_fingerprint(self.base.net))
        fc = t.config.finetune  # with the base's fingerprint
        new = load_dataset(t.config.data, t.progress)
        print(describe_captions(t.config.data.path, len(new), new.captions))  # what was read, e.g. from 2 metadata.jsonl files
        self.new_count, prior = len(new), self.prior_data()
        dataset = new if prior is None else join(new, prior)
        self.item_weights = None
        if prior is not None:  # lambda N / N' per class image (the module docstring)
            self.item_weights = torch.cat([torch.ones(len(new)), torch.full((len(prior),), fc.prior_weight * len(new) / len(prior))])
        self.vae = None
        if self.base.vae is None:
            return dataset
        self.vae = prepare_module(self.base.vae, t.device).requires_grad_(False).eval()
        spec = json.dumps([asdict(t.config.data), fc.base_fingerprint, fc.prior_path, fc.prior_prompts, fc.prior_images, fc.prior_seed])
        return latent_dataset(dataset, self.vae, f"finetune-{hashlib.sha256(spec.encode()).hexdigest()[:16]}", t.device, t.progress)

    def check_base(self, fingerprint: str) -> None:
        check_base(self.trainer, "finetune", fingerprint)

    def prior_data(self) -> ImageDataset | None:
        """Class images for prior preservation: a folder's, or generated by the base model (cached), or None."""
        config = self.trainer.config
        fc, dc, text = config.finetune, config.data, bool(config.text.encoder)
        if fc.prior_path:
            images, names, _ = load_folder(fc.prior_path, dc.image_size, dc.channels, dc.bad_images, 0, self.trainer.progress)
            captions = read_captions(fc.prior_path, names)
            if captions is None and text:
                if len(fc.prior_prompts) != 1:
                    raise UserError(f"the class images in '{fc.prior_path}' have no captions (metadata.jsonl or .txt files): "
                                    "add them, or give their one class prompt with --prior-prompt TEXT")
                captions = [fc.prior_prompts[0]] * len(images)
            return ImageDataset(images, captions=captions if text else None)
        if not fc.prior_images:
            return None
        prompts = [fc.prior_prompts[i % len(fc.prior_prompts)] for i in range(fc.prior_images)] if text else None
        return ImageDataset(self.class_images(prompts), captions=prompts)

    def class_images(self, prompts: list[str] | None) -> torch.Tensor:
        """finetune.prior_images images the base model draws (with the run's sample.* settings) for the class prompts, cached."""
        t = self.trainer
        fc, sc = t.config.finetune, t.config.sample
        spec = json.dumps([fc.base_fingerprint, prompts, fc.prior_images, fc.prior_seed, asdict(sc), t.config.data.image_size, t.device.type])
        path = cache_dir() / "prior" / f"{hashlib.sha256(spec.encode()).hexdigest()[:16]}.safetensors"
        cached = read_cached_tensors(path)
        if cached is not None and len(cached.get("images", ())) == fc.prior_images:
            return cached["images"]
        pipe = Pipeline.from_parts(replace(self.base, config=t.config), str(t.device))  # the run's sample.* settings
        images = to_uint8(pipe.sample(fc.prior_images, prompts=prompts, seed=fc.prior_seed, progress=t.progress))
        try:
            save_tensors_atomic({"images": images}, path)
        except (OSError, SafetensorError) as err:
            warn(f"could not cache the class images in {path} ({err}); they are drawn again next time")
        return images

    # ------------------------------------------------------------------ the networks: LoRAs on the frozen base

    def build(self) -> Trained:
        t = self.trainer
        fc = t.config.finetune
        self.schedule = make_schedule(t.config.diffusion)
        self.unet = prepare_module(self.base.net, t.device).requires_grad_(False).eval()
        choose_layout(self.unet, example_inputs(t.config, t.config.train.batch_size, t.device), training=True, autocast_dtype=t.autocast_dtype)
        encoder = self.base.text_encoder.to(t.device) if self.base.text_encoder is not None else None
        self.batches = DiffusionBatches(t, self.vae, self.item_weights)
        self.batches.use_captions(encoder, encode_every_step=fc.text_encoder)  # a text-encoder LoRA: captions encoded each step, with gradients
        torch.manual_seed(t.config.train.seed)  # the LoRAs' initial A, whatever loading drew before
        nets = {"unet": self.unet}
        self.inject(self.unet, fc.targets)
        if fc.text_encoder:
            if self.batches.text_encoder is None:
                raise UserError(f"'{base_path(fc.base)}' has no text encoder to fine-tune; drop --text-encoder")
            nets["text_encoder"] = text_model(self.batches.text_encoder)
            self.inject(nets["text_encoder"], ("attention",))
        # what trains is the LoRAs' tensors as one module; a step runs the base U-Net they sit on
        return Trained(LoRAWeights(nets, ADAPTER), runs_through=self.unet)

    def inject(self, net: torch.nn.Module, targets) -> None:
        fc = self.trainer.config.finetune
        try:
            inject_lora(net, ADAPTER, fc.rank, fc.alpha or None, targets, fc.dropout)
        except UserError as err:
            raise UserError(f"cannot fine-tune '{base_path(fc.base)}': {err}; choose layers it has with --lora-targets, "
                            "e.g. --lora-targets conv (the ResBlocks' convolutions)") from None

    def train_step(self) -> dict[str, float]:
        """The diffusion loss on new images and class images alike, each item weighted (module docstring)."""
        return diffusion_step(self.trainer, self.batches, self.schedule)

    # ------------------------------------------------------------------ outputs: grids, the LoRA file

    @contextlib.contextmanager
    def ema_weights(self):
        """The EMA LoRA in the networks for a while (grids, evaluations, the LoRA file); then the trained one, bit for bit."""
        lora_net, ema = self.trainer.net, self.trainer.ema
        live, mode = {k: v.clone() for k, v in lora_net.state_dict().items()}, lora_net.training
        lora_net.load_state_dict(ema.state_dict())
        try:
            yield
        finally:
            lora_net.load_state_dict(live)
            lora_net.train(mode)  # a Pipeline puts the U-Net, and so its LoRAs, in eval mode

    def sample_grid(self) -> Path:
        """The base U-Net with the EMA LoRA, on the new images' captions (not the class images')."""
        with self.ema_weights():
            return self.batches.sample_grid(self.batches.pipeline(self.unet), self.new_captions())

    def evaluate(self) -> dict:
        with self.ema_weights():
            return self.batches.evaluate(self.batches.pipeline(self.unet))

    def new_captions(self) -> list[str] | None:
        return self.trainer.dataset.captions[: self.new_count] if self.batches.captions is not None else None

    def on_start(self, resumed: bool) -> None:
        """The grid before training (step 0: the base model), or on resume the LoRA file of its checkpoint."""
        if resumed:
            self.write_lora(final=False)
        elif self.trainer.state.step == 0:
            self.trainer.try_sample_grid()

    def on_saved(self, checkpoint: Path, final: bool) -> None:
        self.write_lora(final)

    def write_lora(self, final: bool) -> None:
        """RUN/lora.safetensors: the EMA LoRA in the diffusers / peft layout, with the base model's fingerprint."""
        t = self.trainer
        fc, path = t.config.finetune, t.run_dir / RUN_FILE
        prompts = list(dict.fromkeys(self.new_captions()))[:64] if self.batches.captions is not None else []
        metadata = {BASE_FINGERPRINT: fc.base_fingerprint, BASE_NAME: fc.base or DEMO, "diffusekit.step": str(t.state.step),
                    "diffusekit.prompts": json.dumps(prompts)}

        def write():
            with self.ema_weights():
                save_lora(path, self.unet, ADAPTER, text_encoder=self.batches.text_encoder, metadata=metadata)

        save_output("the LoRA file", path, write, final)
