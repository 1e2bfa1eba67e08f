"""The latent cache: a dataset encoded once by the autoencoder, for latent diffusion.

Each image's posterior q(z | x) = N(mean, std^2) is stored (already scaled by the
VAE's scale/shift factors), so training draws a fresh z = mean + std * eps every
time, as LDM does, without running the encoder again. The cache lives under
$DIFFUSEKIT_CACHE/latents/NAME/ as shards (shard_00000.safetensors, ...) plus a
manifest.json holding the fingerprint of the data and of the VAE; a manifest with
another fingerprint (changed images, a retrained VAE) or a missing shard marks the
cache stale, and it is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffusekit.data import ImageDataset, to_float
from diffusekit.distributed import draw_for_global_batch
from diffusekit.files import cache_dir, read_cached_tensors, save_tensors_atomic, write_json_atomic

SHARD_SIZE = 1024


@dataclass
class LatentDataset:
    mean: torch.Tensor  # [N, c, h, w], scaled latents
    std: torch.Tensor
    labels: torch.Tensor | None = None
    num_classes: int = 0
    captions: list[str] | None = None

    def __len__(self) -> int:
        return len(self.mean)

    def sample(self, idx: torch.Tensor, generator: torch.Generator, rank: int = 0, world: int = 1) -> torch.Tensor:
        """z = mean + std * eps for the items idx (eps from the generator, on its device).

        With `world` processes, idx is rank `rank`'s share of a global batch: eps is drawn for the
        whole global batch and this rank's rows kept (as losses.draw_sigma_and_noise does).
        """
        mean, std = self.mean[idx], self.std[idx]
        noise = draw_for_global_batch(lambda n: torch.randn((n, *mean.shape[1:]), generator=generator, device=generator.device), len(idx), rank, world)
        return mean.to(noise.device) + std.to(noise.device) * noise


def fingerprint(images: torch.Tensor, vae_state: dict[str, torch.Tensor], scale: float, shift: float) -> str:
    """sha256 over the uint8 images and the autoencoder's weights and latent scaling."""
    digest = hashlib.sha256()
    digest.update(str((tuple(images.shape), scale, shift)).encode())
    digest.update(images.contiguous().numpy().tobytes())
    for name in sorted(vae_state):
        digest.update(name.encode())
        digest.update(vae_state[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_cache(folder: Path, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (mean, std), or None when the cache is missing, incomplete or stale."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None
    info = json.loads(manifest.read_text())
    shards = [folder / name for name in info.get("shards", [])]
    if info.get("key") != key or not all(p.is_file() for p in shards):
        return None
    parts = [read_cached_tensors(p) for p in shards]
    if any(p is None for p in parts):  # a damaged shard: rebuild
        return None
    return torch.cat([p["mean"] for p in parts]), torch.cat([p["std"] for p in parts])


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, device, batch_size: int = 128, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of q(z | x) for uint8 images, scaled by the VAE's latent scale/shift."""
    means, stds = [], []
    for part in tqdm(images.split(batch_size), desc="encoding latents", disable=not progress, file=sys.stderr, leave=False):
        posterior = vae.encode(to_float(part).to(device))
        means.append(vae.scale_latents(posterior.mean).float().cpu())
        stds.append((posterior.std * vae.scale_factor).float().cpu())
    return torch.cat(means), torch.cat(stds)


def write_cache(folder: Path, key: str, mean: torch.Tensor, std: torch.Tensor) -> None:
    if folder.exists():
        shutil.rmtree(folder)  # stale: rebuilt from scratch
    folder.mkdir(parents=True)
    names = []
    for i, start in enumerate(range(0, len(mean), SHARD_SIZE)):
        name = f"shard_{i:05d}.safetensors"
        save_tensors_atomic({"mean": mean[start : start + SHARD_SIZE], "std": std[start : start + SHARD_SIZE]}, folder / name)
        names.append(name)
    write_json_atomic(folder / "manifest.json", {"key": key, "shards": names, "count": len(mean), "shape": list(mean.shape[1:])})


def latent_dataset(dataset: ImageDataset, vae, name: str, device, progress: bool = True) -> LatentDataset:
    """`dataset` encoded by `vae`, from the cache folder `name` when it is fresh, else encoded and cached."""
    key = fingerprint(dataset.images, vae.state_dict(), vae.scale_factor, vae.shift_factor)
    folder = cache_dir() / "latents" / name
    cached = read_cache(folder, key)
    if cached is None:
        mean, std = encode_images(vae, dataset.images, device, progress=progress)
        write_cache(folder, key, mean, std)
    else:
        mean, std = cached
    return LatentDataset(mean, std, dataset.labels, dataset.num_classes, dataset.captions)
