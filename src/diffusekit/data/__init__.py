"""Datasets held in memory as uint8 tensors, and the shuffled batch stream used in training."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffusekit.distributed import draw_for_global_batch
from diffusekit.errors import UserError
from diffusekit.seeds import derive_seed


@dataclass
class ImageDataset:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor | None = None  # int64 [N], class labels where the data has them
    num_classes: int = 0
    skipped: int = 0  # unreadable files left out
    captions: list[str] | None = None  # one text per image where the data has them

    def __len__(self) -> int:
        return len(self.images)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def fit_images(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """Resize square uint8 images to `size` and convert 1 <-> 3 channels."""
    if images.shape[1] != channels:
        images = images.repeat(1, 3, 1, 1) if channels == 3 else images.float().mean(1, keepdim=True).round().to(torch.uint8)
    if images.shape[-1] != size:
        resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        images = resized.round().clamp(0, 255).to(torch.uint8)
    return images


def load_dataset(cfg, progress: bool = True) -> ImageDataset:
    """The dataset a DataConfig names, at its image size and channel count."""
    if cfg.dataset == "mnist":
        from diffusekit.data.mnist import digit_caption, load_mnist

        images, labels = load_mnist()
        captions = [digit_caption(int(label)) for label in labels]
        dataset = ImageDataset(fit_images(images, cfg.image_size, cfg.channels), labels, num_classes=10, captions=captions)
    elif cfg.dataset == "folder":
        from diffusekit.data.folder import load_folder, read_captions

        images, names, skipped = load_folder(cfg.path, cfg.image_size, cfg.channels, cfg.bad_images, cfg.limit, progress)
        dataset = ImageDataset(images, skipped=skipped, captions=read_captions(cfg.path, names))
    elif cfg.dataset == "emoji":
        from diffusekit.data.emoji import load_emoji

        images, captions = load_emoji(cfg.image_size, cfg.font or None, cfg.limit, progress)
        dataset = ImageDataset(fit_images(images, cfg.image_size, cfg.channels), captions=captions)
    elif cfg.dataset == "none":
        raise UserError("this config has no training data (data.dataset = none, e.g. a model imported from diffusers); set data.dataset")
    else:
        raise UserError(f"unknown dataset '{cfg.dataset}'; use mnist, emoji or folder")
    if cfg.limit and len(dataset) > cfg.limit:
        dataset = evenly_spaced_subset(dataset, cfg.limit)
    return dataset


def evenly_spaced_subset(dataset: ImageDataset, count: int) -> ImageDataset:
    """`count` items spread evenly over the dataset, so a subset of sorted data keeps every class."""
    idx = torch.linspace(0, len(dataset) - 1, count).round().long()
    labels = dataset.labels[idx] if dataset.labels is not None else None
    captions = [dataset.captions[i] for i in idx.tolist()] if dataset.captions is not None else None
    return ImageDataset(dataset.images[idx], labels, dataset.num_classes, dataset.skipped, captions)


class BatchStream:
    """An endless stream of index batches over N items, reshuffled each epoch.

    Epoch e is a permutation drawn from a generator seeded with (seed, e), and the
    state is just (epoch, position): a resumed run sees exactly the same batches.
    Batches run across epoch boundaries, so every batch is full.
    With `world` ranks, each step consumes batch_size * world indices and rank r
    takes every world-th of them, starting at r.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n < 1:
            raise UserError("the dataset is empty")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.position = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch)))

    def next_indices(self) -> torch.Tensor:
        return draw_for_global_batch(self._take, self.batch_size, self.rank, self.world)

    def _take(self, need: int) -> torch.Tensor:
        """The next `need` indices of the epochs' permutations."""
        parts = []
        while need:
            take = min(need, self.n - self.position)
            parts.append(self._perm[self.position : self.position + take])
            self.position += take
            need -= take
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return torch.cat(parts)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm = self._permutation(self.epoch)
