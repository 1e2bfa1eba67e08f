"""Training a diffusion model: the network (U-Net or DiT) learns to predict eps / x0 / v from noised data.

Each step: a batch x0 (pixels in [-1, 1], or for a latent model z ~ q(z | x) from the
latent cache, data/latents.py), t ~ U{0..T-1}, eps ~ N(0, I),
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, and a (weighted) MSE on the target
(losses.py); a flow model draws t in [0, 1] and trains on x_t = (1 - t) x0 + t eps (flow.py). Class labels are replaced by the null class with probability
train.label_dropout, captions by the empty prompt with probability text.caption_dropout,
so that classifier-free guidance has an unconditional model. Captions are encoded once
(nn/text.py CaptionEmbeddings) and the network cross-attends to their token embeddings.
The loop itself (EMA, budgets, checkpoints, exact resume) is trainer.Trainer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch

from diffusekit.config import Config
from diffusekit.data import load_dataset, to_float
from diffusekit.data.latents import latent_dataset
from diffusekit.devices import prepare_module
from diffusekit.distributed import draw_for_global_batch
from diffusekit.errors import UserError
from diffusekit.files import read_tensors, write_json_atomic
from diffusekit.images import save_grid
from diffusekit.io.checkpoint import latest_checkpoint, load_config, load_weights, resolve_checkpoint
from diffusekit.layout import choose_layout
from diffusekit.losses import diffusion_loss, draw_sigma_and_noise
from diffusekit.models import build_net, build_text_encoder, build_vae, example_inputs, text_condition
from diffusekit.nn.state import load_state_dict_checked
from diffusekit.nn.text import CaptionEmbeddings
from diffusekit.pipeline import Pipeline
from diffusekit.schedule import make_schedule
from diffusekit.trainer import Trainer, TrainResult, run_training


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


class DiffusionTrainer(Trainer):
    item_weights: torch.Tensor | None = None  # a loss weight per dataset item (None: all 1); finetune.py's prior images

    def load_data(self):
        images = load_dataset(self.config.data, self.progress)
        self.vae = None
        if not self.config.latent.vae:
            return images
        vae = build_vae(self.config)
        load_state_dict_checked(vae, *self.vae_weights())
        self.vae = prepare_module(vae, self.device).requires_grad_(False).eval()
        return latent_dataset(images, self.vae, latent_cache_name(self.config), self.device, self.progress)

    def vae_weights(self) -> tuple[dict, str]:
        """(the autoencoder's weights, where they are from): latent.vae's EMA weights for a new run, the run's own on resume."""
        if self.resume_from is not None:  # the autoencoder this run was trained with, kept in its checkpoint
            return read_tensors(self.resume_from / "vae.safetensors"), str(self.resume_from)
        return load_weights(resolve_checkpoint(self.config.latent.vae), "ema"), self.config.latent.vae

    def build(self) -> torch.nn.Module:
        self.schedule = make_schedule(self.config.diffusion)
        self.labels = self._class_labels()
        self.text_encoder, self.captions = self._caption_embeddings()
        if self.vae is not None:
            self.extra_modules["vae"] = self.vae  # saved in every checkpoint: a latent checkpoint decodes on its own
        return build_net(self.config)

    def place(self, net: torch.nn.Module) -> torch.nn.Module:
        """The denoising network on the device, in the memory layout a training step runs fastest in here (layout.py)."""
        net = prepare_module(net, self.device)
        inputs = example_inputs(self.config, self.config.train.batch_size, self.device)
        self.layout = choose_layout(net, inputs, training=True, autocast_dtype=self.autocast_dtype)
        return net

    def _class_labels(self) -> torch.Tensor | None:
        wanted, dataset = self.config.model.num_classes, self.dataset
        if not wanted:
            return None
        if dataset.labels is None:
            raise UserError(f"model.num_classes = {wanted} but the {self.config.data.dataset} dataset has no class labels; set model.num_classes=0")
        if dataset.num_classes != wanted:
            raise UserError(f"model.num_classes = {wanted} but the dataset has {dataset.num_classes} classes; set model.num_classes={dataset.num_classes}")
        return dataset.labels.to(self.device)

    def _caption_embeddings(self, encoder=None):
        """The text encoder (`encoder`, or the config's) and every caption encoded once (row 0: the empty prompt), for a text model."""
        if not self.config.text.encoder:
            return None, None
        if self.dataset.captions is None:
            raise UserError(
                f"text.encoder is set but the {self.config.data.dataset} dataset has no captions; for an image folder add "
                "metadata.jsonl (lines of {\"file_name\": ..., \"text\": ...}) or a .txt file beside each image"
            )
        encoder = build_text_encoder(self.config, self.device) if encoder is None else encoder
        return encoder, CaptionEmbeddings(self.dataset.captions, encoder)

    def uniform(self, count: int) -> torch.Tensor:
        """count draws from U[0, 1) on the training generator, on the training device (this rank's rows of a draw for the global batch)."""
        values = draw_for_global_batch(lambda n: torch.rand(n, generator=self.generator, device=self.generator.device), count, self.rank, self.world)
        return values.to(self.device)

    def caption_condition(self, rows: torch.Tensor) -> dict:
        """The U-Net's text inputs for caption rows (CaptionEmbeddings; row 0 is the empty prompt)."""
        return text_condition(self.captions.hidden[rows].to(self.device), self.captions.mask[rows].to(self.device), self.config.text.mask_padding)

    def next_batch(self) -> tuple[torch.Tensor, dict | None, torch.Tensor | None]:
        """(x0, the condition, each item's loss weight or None) of the next batch."""
        idx = self.stream.next_indices()
        weights = self.item_weights[idx].to(self.device) if self.item_weights is not None else None
        if self.vae is not None:  # a fresh z ~ q(z | x) from the cached posterior
            x0 = self.dataset.sample(idx, self.generator, self.rank, self.world).to(self.device)
        else:
            x0 = to_float(self.dataset.images[idx]).to(self.device)
            if self.config.data.hflip:
                x0 = torch.where((self.uniform(len(idx)) < 0.5)[:, None, None, None], x0.flip(-1), x0)
        if self.captions is not None:
            rows = self.captions.index[idx]
            if self.config.text.caption_dropout > 0:  # the empty prompt, so that guidance has an unconditional model
                rows = torch.where(self.uniform(len(idx)).cpu() < self.config.text.caption_dropout, 0, rows)
            return x0, self.caption_condition(rows), weights
        if self.labels is None:
            return x0, None, weights
        labels = self.labels[idx.to(self.device)]
        if self.config.train.label_dropout > 0:  # the null class, so that guidance has an unconditional model
            drop = self.uniform(len(idx)) < self.config.train.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.config.model.num_classes), labels)
        return x0, {"class_labels": labels}, weights

    def train_step(self) -> dict[str, float]:
        dc = self.config.diffusion
        x0, cond, weights = self.next_batch()
        sigma, noise = draw_sigma_and_noise(self.schedule, x0, self.generator, self.rank, self.world)  # for the whole batch, then split
        loss = self.backward_over_micro_batches(x0, cond, lambda part, x0_part, part_cond: diffusion_loss(
            self.train_net, self.schedule, x0_part, prediction=dc.prediction, weighting=dc.loss_weighting,
            snr_gamma=dc.snr_gamma, cond=part_cond, sigma=sigma[part], noise=noise[part],
            sample_weights=weights[part] if weights is not None else None))
        self.finish_step(len(x0), stepped=self.optimizer_step())
        return {"loss": loss}

    def backward_over_micro_batches(self, x0: torch.Tensor, cond: dict | None, loss_of) -> float:
        """Forward and backward the batch in train.grad_accumulation micro-batches of train.batch_size;
        loss_of(part, x0[part], cond[part]) is one micro-batch's loss. Returns the mean loss."""
        tc = self.config.train
        micro, total = tc.batch_size, 0.0
        for i in range(tc.grad_accumulation):
            part = slice(i * micro, (i + 1) * micro)
            part_cond = {k: v[part] for k, v in cond.items()} if cond else None
            with self.gradient_sync(last=i == tc.grad_accumulation - 1):
                with self.autocast():
                    loss = loss_of(part, x0[part], part_cond)
                (loss / tc.grad_accumulation).backward()
            total += loss.detach()
        return float(total) / tc.grad_accumulation

    def pipeline(self) -> Pipeline:
        """The EMA model as a pipeline (for sample grids and evaluation)."""
        return Pipeline(self.config, self.ema, self.device, vae=self.vae, text_encoder=self.text_encoder)

    def grid_prompts(self, n: int, captions: list[str] | None = None) -> list[str]:
        """n distinct captions (default: the training captions) spread over the list (in order, so each row is stable)."""
        unique = list(dict.fromkeys(self.dataset.captions if captions is None else captions))
        return [unique[i] for i in torch.linspace(0, len(unique) - 1, min(n, len(unique))).round().long().tolist()]

    def sample_grid(self) -> Path:
        pipe = self.pipeline()
        sc = pipe.config.sample
        classes = self.config.model.num_classes
        labels = torch.arange(sc.n) % classes if classes else None  # one class per column
        prompts = self.grid_prompts(sc.n) if self.captions is not None else None
        count = sc.n - sc.n % len(prompts) if prompts else sc.n  # every prompt the same number of times
        images = pipe.sample(count, steps=sc.steps, sampler=sc.sampler, spacing=sc.spacing, seed=sc.seed, labels=labels, prompts=prompts)
        columns = classes or (len(prompts) if prompts and len(prompts) <= 16 else None)  # a column per class or prompt
        path = save_grid(images, self.run_dir / "samples" / f"step_{self.step:08d}.png", ncols=columns)
        if prompts is not None:
            write_json_atomic(path.with_suffix(".json"), {"prompts": prompts})
        return path

    def evaluate(self) -> dict:
        from diffusekit.evaluate import evaluate_checkpoint

        ec = self.config.eval
        return evaluate_checkpoint(None, n=ec.n, sampler=ec.sampler, steps=ec.steps, features=ec.features or None, pipeline=self.pipeline())


def train(config: Config, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Train the diffusion model of `config` into `run_dir` (a new run, or --resume the run there)."""
    if config.task != "diffusion":
        command = "diffusekit finetune BASE --data DIR --out RUN --resume" if config.task == "finetune" else "diffusekit train-vae"
        raise UserError(f"this config describes an {config.task}: train it with `{command}`")
    resume_from = latest_checkpoint(Path(run_dir)) if resume else None
    return run_training(DiffusionTrainer, resolve_latent_config(config, resume_from), run_dir, resume=resume, overwrite=overwrite, progress=progress)
