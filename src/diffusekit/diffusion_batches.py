"""What a diffusion model trains on, shared by every recipe that trains one (train, finetune, distill).

    batches = DiffusionBatches(trainer, vae, item_weights)    # after the recipe loaded trainer.dataset
    batches.use_captions(encoder)                             # a text model: every caption encoded once
    x0, cond, weights = batches.next_batch()                  # one step's batch, its condition, per-item loss weights

x0 is pixels in [-1, 1] (randomly flipped with data.hflip), or for a latent model a fresh z ~ q(z | x) from
the latent cache (data/latents.py). Class labels are replaced by the null class with probability
train.label_dropout, captions by the empty prompt with probability text.caption_dropout, so that
classifier-free guidance has an unconditional model. Every random draw comes from the trainer's
generator, drawn for the whole global batch and split by rank (distributed.draw_for_global_batch).
The same object draws sample grids of a recipe's pipeline (fixed labels or prompts per column).
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffusekit.data import to_float
from diffusekit.distributed import draw_for_global_batch
from diffusekit.errors import UserError
from diffusekit.files import write_json_atomic
from diffusekit.images import save_grid
from diffusekit.models import build_text_encoder, text_condition
from diffusekit.nn.text import CaptionEmbeddings
from diffusekit.pipeline import Pipeline


class DiffusionBatches:
    def __init__(self, trainer, vae: torch.nn.Module | None = None, item_weights: torch.Tensor | None = None):
        self.trainer, self.config, self.device = trainer, trainer.config, trainer.device
        self.dataset, self.vae = trainer.dataset, vae
        self.item_weights = item_weights  # a loss weight per dataset item (None: all 1); finetune's class images
        self.labels = self.class_labels()
        self.text_encoder: torch.nn.Module | None = None
        self.captions: CaptionEmbeddings | None = None
        self.encode_every_step = False  # a text encoder that trains (a LoRA in it) encodes the captions each step

    def class_labels(self) -> torch.Tensor | None:
        wanted, dataset = self.config.model.num_classes, self.dataset
        if not wanted:
            return None
        if dataset.labels is None:
            raise UserError(f"model.num_classes = {wanted} but the {self.config.data.dataset} dataset has no class labels; set model.num_classes=0")
        if dataset.num_classes != wanted:
            raise UserError(f"model.num_classes = {wanted} but the dataset has {dataset.num_classes} classes; set model.num_classes={dataset.num_classes}")
        return dataset.labels.to(self.device)

    def use_captions(self, encoder: torch.nn.Module | None = None, encode_every_step: bool = False) -> None:
        """For a text model: the text encoder (`encoder`, or the config's) and every caption encoded once (row 0: the empty prompt)."""
        if not self.config.text.encoder:
            return
        if self.dataset.captions is None:
            raise UserError(
                f"text.encoder is set but the {self.config.data.dataset} dataset has no captions; for an image folder add "
                "metadata.jsonl (lines of {\"file_name\": ..., \"text\": ...}) or a .txt file beside each image"
            )
        self.text_encoder = build_text_encoder(self.config, self.device) if encoder is None else encoder
        self.captions = CaptionEmbeddings(self.dataset.captions, self.text_encoder)
        self.encode_every_step = encode_every_step

    # ------------------------------------------------------------------ draws

    def uniform(self, count: int) -> torch.Tensor:
        """count draws from U[0, 1) on the training generator, on the training device (this rank's rows of a draw for the global batch)."""
        generator, t = self.trainer.generator, self.trainer
        values = draw_for_global_batch(lambda n: torch.rand(n, generator=generator, device=generator.device), count, t.rank, t.world)
        return values.to(self.device)

    def normal(self, like: torch.Tensor) -> torch.Tensor:
        """eps ~ N(0, I) of x0's shape on the training generator (this rank's rows of a draw for the global batch)."""
        generator, t = self.trainer.generator, self.trainer
        draw = lambda n: torch.randn((n, *like.shape[1:]), generator=generator, device=generator.device, dtype=like.dtype)  # noqa: E731
        return draw_for_global_batch(draw, len(like), t.rank, t.world).to(self.device)

    # ------------------------------------------------------------------ a batch

    def next_batch(self) -> tuple[torch.Tensor, dict | None, torch.Tensor | None]:
        """(x0, the condition, each item's loss weight or None) of the next batch."""
        t = self.trainer
        idx = self.last_indices = t.state.stream.next_indices()  # the dataset rows (a ControlNet run takes their control images)
        weights = self.item_weights[idx].to(self.device) if self.item_weights is not None else None
        if self.vae is not None:  # a fresh z ~ q(z | x) from the cached posterior
            x0 = self.dataset.sample(idx, t.generator, t.rank, t.world).to(self.device)
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

    def caption_condition(self, rows: torch.Tensor) -> dict:
        """The U-Net's text inputs for caption rows (row 0 is the empty prompt): encoded once, or now when the encoder trains."""
        if self.encode_every_step:
            hidden, mask = self.text_encoder([self.captions.texts[r] for r in rows.tolist()])
            return text_condition(hidden, mask.to(self.device), self.config.text.mask_padding)
        return text_condition(self.captions.hidden[rows].to(self.device), self.captions.mask[rows].to(self.device), self.config.text.mask_padding)

    def null_condition(self, cond: dict, n: int) -> dict:
        """The unconditional input guidance pulls away from: the null class, or the empty prompt (caption row 0)."""
        if "class_labels" in cond:
            return {"class_labels": torch.full((n,), self.config.model.num_classes, dtype=torch.long, device=self.device)}
        rows = torch.zeros(n, dtype=torch.long)
        return {k: v for k, v in zip(("context", "context_mask"), (self.captions.hidden[rows].to(self.device), self.captions.mask[rows].to(self.device)))
                if k in cond}

    # ------------------------------------------------------------------ what the model draws

    def pipeline(self, net: torch.nn.Module, config=None) -> Pipeline:
        """`net` (the EMA, or a U-Net carrying the EMA LoRA) as a pipeline with this run's autoencoder and text encoder."""
        return Pipeline(config or self.trainer.config, net, self.device, vae=self.vae, text_encoder=self.text_encoder)

    def grid_prompts(self, n: int, captions: list[str] | None = None) -> list[str]:
        """n distinct captions (default: the training captions) spread over the list (in order, so each row is stable)."""
        unique = list(dict.fromkeys(self.dataset.captions if captions is None else captions))
        return [unique[i] for i in torch.linspace(0, len(unique) - 1, min(n, len(unique))).round().long().tolist()]

    def sample_grid(self, pipe: Pipeline, captions: list[str] | None = None) -> Path:
        """RUN/samples/step_N.png: the pipeline's samples with its sample.* settings, a column per class or prompt."""
        sc, classes = pipe.config.sample, self.config.model.num_classes
        labels = torch.arange(sc.n) % classes if classes else None  # one class per column
        prompts = self.grid_prompts(sc.n, captions) if self.captions is not None else None
        count = sc.n - sc.n % len(prompts) if prompts else sc.n  # every prompt the same number of times
        images = pipe.sample(count, steps=sc.steps, sampler=sc.sampler, spacing=sc.spacing, seed=sc.seed, labels=labels, prompts=prompts)
        columns = classes or (len(prompts) if prompts and len(prompts) <= 16 else None)  # a column per class or prompt
        path = save_grid(images, self.trainer.run_dir / "samples" / f"step_{self.trainer.state.step:08d}.png", ncols=columns)
        if prompts is not None:
            write_json_atomic(path.with_suffix(".json"), {"prompts": prompts})
        return path

    def evaluate(self, pipe: Pipeline) -> dict:
        """The eval.* report of the pipeline's samples (FD and friends), for metrics.jsonl."""
        from diffusekit.evaluate import evaluate_checkpoint

        ec = self.config.eval
        return evaluate_checkpoint(None, n=ec.n, sampler=ec.sampler, steps=ec.steps, features=ec.features or None, pipeline=pipe)
