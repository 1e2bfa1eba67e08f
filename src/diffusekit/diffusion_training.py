"""Training a diffusion model: the network (U-Net or DiT) learns to predict eps / x0 / v from noised data.

    train(config, "runs/mnist")     # = run_training(DiffusionRecipe, config, "runs/mnist")

Each step (diffusion_step): a batch x0 with its condition (diffusion_batches.py: pixels or latents,
labels or captions dropped for guidance), sigma drawn by the schedule and eps ~ N(0, I), and the
(weighted) loss of D(x0 + sigma eps, sigma) against its target (losses.py; a DDPM model's sigma is
sqrt((1 - abar_t) / abar_t), a flow model's t / (1 - t)). Captions are encoded once
(nn/text.py CaptionEmbeddings) and the network cross-attends to their token embeddings.
The loop itself (EMA, budgets, checkpoints, exact resume) is trainer.Trainer; finetune.py and
distill.py call diffusion_step / DiffusionBatches too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

from diffusekit.config import Config
from diffusekit.data import load_dataset
from diffusekit.data.latents import latent_dataset
from diffusekit.devices import prepare_module
from diffusekit.diffusion_batches import DiffusionBatches
from diffusekit.errors import UserError
from diffusekit.files import read_tensors
from diffusekit.io.checkpoint import latest_checkpoint, load_config, load_weights, resolve_checkpoint
from diffusekit.layout import choose_layout
from diffusekit.losses import diffusion_loss, draw_sigma_and_noise
from diffusekit.models import build_net, build_vae, example_inputs
from diffusekit.nn.state import load_state_dict_checked
from diffusekit.schedule import make_schedule
from diffusekit.trainer import Recipe, Trained, Trainer, TrainResult, run_training


def resolve_latent_config(config: Config, resume_from: Path | None = None) -> Config:
    """For a latent model, take the autoencoder's config (with its measured latent scale) from its checkpoint:
    the latent.vae run's for a new run, the run's own checkpoint's on resume (whatever became of latent.vae)."""
    if not config.latent.vae:
        return config
    if resume_from is not None:
        return replace(config, vae=load_config(resume_from).vae)
    ckpt = resolve_checkpoint(config.latent.vae)
    vae_config = load_config(ckpt)
    if vae_config.task != "autoencoder":
        raise UserError(f"latent.vae = '{config.latent.vae}' is not an autoencoder run; train one with `diffusekit train-vae` first")
    if vae_config.data.channels != config.data.channels:
        raise UserError(f"the autoencoder in '{config.latent.vae}' takes {vae_config.data.channels}-channel images, but data.channels = {config.data.channels}")
    return replace(config, vae=vae_config.vae)


def latent_cache_name(config: Config) -> str:
    spec = json.dumps({"data": asdict(config.data), "vae": str(Path(config.latent.vae).resolve())}, sort_keys=True)
    return f"{config.data.dataset}-{config.data.image_size}px-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"


def diffusion_step(trainer: Trainer, batches: DiffusionBatches, schedule) -> dict[str, float]:
    """One optimizer step of the diffusion loss (losses.py) through trainer.train_net, on the next batch;
    a sigma and eps per item drawn for the whole batch before it is split into micro-batches."""
    dc = trainer.config.diffusion
    x0, cond, weights = batches.next_batch()
    sigma, noise = draw_sigma_and_noise(schedule, x0, trainer.generator, trainer.rank, trainer.world)
    loss = trainer.backward_micro_batches(cond, lambda part, part_cond: diffusion_loss(
        trainer.train_net, schedule, x0[part], prediction=dc.prediction, weighting=dc.loss_weighting, snr_gamma=dc.snr_gamma,
        cond=part_cond, sigma=sigma[part], noise=noise[part], sample_weights=weights[part] if weights is not None else None))
    trainer.finish_step(len(x0), stepped=trainer.optimizer_step())
    return {"loss": loss}


class DiffusionRecipe(Recipe):
    """A diffusion model trained from scratch: the network (U-Net or DiT, in its fastest layout), its EMA, a latent model's VAE."""

    def load_data(self):
        dataset, self.vae = images_or_latents(self.trainer, self.vae_weights)
        return dataset

    def vae_weights(self) -> tuple[dict, str]:
        """(the autoencoder's weights, where they are from): latent.vae's EMA weights for a new run, the run's own on resume."""
        t = self.trainer
        if t.resume_from is not None:  # the autoencoder this run was trained with, kept in its checkpoint
            return read_tensors(t.resume_from / "vae.safetensors"), str(t.resume_from)
        return load_weights(resolve_checkpoint(t.config.latent.vae), "ema"), t.config.latent.vae

    def build(self) -> Trained:
        t = self.trainer
        self.schedule = make_schedule(t.config.diffusion)
        self.batches = DiffusionBatches(t, self.vae)
        self.batches.use_captions()
        net = prepare_module(build_net(t.config), t.device)
        inputs = example_inputs(t.config, t.config.train.batch_size, t.device)
        self.layout = choose_layout(net, inputs, training=True, autocast_dtype=t.autocast_dtype)  # the fastest for a step here (layout.py)
        return Trained(net, saved={"vae": self.vae} if self.vae is not None else {})  # a latent checkpoint decodes on its own

    def train_step(self) -> dict[str, float]:
        return diffusion_step(self.trainer, self.batches, self.schedule)

    def sample_grid(self) -> Path:
        return self.batches.sample_grid(self.batches.pipeline(self.trainer.ema))

    def evaluate(self) -> dict:
        return self.batches.evaluate(self.batches.pipeline(self.trainer.ema))


def images_or_latents(trainer: Trainer, vae_weights) -> tuple:
    """(the dataset, the frozen autoencoder or None): the run's images, or for a latent model (latent.vae) their
    cached posteriors under the autoencoder with the weights vae_weights() gives as (tensors, where from)."""
    config = trainer.config
    images = load_dataset(config.data, trainer.progress)
    if not config.latent.vae:
        return images, None
    vae = build_vae(config)
    load_state_dict_checked(vae, *vae_weights())
    vae = prepare_module(vae, trainer.device).requires_grad_(False).eval()
    return latent_dataset(images, vae, latent_cache_name(config), trainer.device, trainer.progress), vae


def train(config: Config, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Train the diffusion model of `config` into `run_dir` (a new run, or --resume the run there)."""
    if config.task != "diffusion":
        command = "diffusekit finetune BASE --data DIR --out RUN --resume" if config.task == "finetune" else "diffusekit train-vae"
        raise UserError(f"this config describes an {config.task}: train it with `{command}`")
    resume_from = latest_checkpoint(Path(run_dir)) if resume else None
    return run_training(DiffusionRecipe, resolve_latent_config(config, resume_from), run_dir, resume=resume, overwrite=overwrite, progress=progress)
