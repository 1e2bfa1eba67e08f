"""Training the KL autoencoder of latent diffusion (`diffusekit train-vae`).

Loss per image (Rombach et al. 2022, appendix G; sums over pixels and latents as in LDM):

    L = sum(l1 |x - x_rec| + l2 (x - x_rec)^2) + kl * KL(q(z|x) || N(0, I)) + lambda * disc_weight * L_G

L_G = -E[D(x_rec)] is the generator's hinge loss against a patch discriminator D that
starts at vae_loss.disc_start, with lambda the adaptive weight of Esser et al. 2021
(eq. 7). D itself minimises the hinge loss on real and reconstructed images.

Each checkpoint records the latent scale factor 1 / std(z) over the data (LDM's
scale_by_std) in its config (vae.scale_factor), so latent diffusion gets unit-scale latents.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from diffusekit.config import Config, config_to_dict
from diffusekit.data import load_dataset, to_float
from diffusekit.devices import prepare_module
from diffusekit.errors import ConfigError
from diffusekit.files import write_json_atomic
from diffusekit.images import save_grid
from diffusekit.nn.discriminator import PatchDiscriminator, adaptive_weight, hinge_d_loss
from diffusekit.nn.vae import AutoencoderKL
from diffusekit.optim import make_optimizer
from diffusekit.trainer import Trainer, TrainResult, run_training

SCALE_IMAGES = 1024  # images encoded to measure the latent scale
GRID_IMAGES = 16


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, images: torch.Tensor, device, batch_size: int = 128) -> float:
    """1 / std of sampled latents z ~ q(z | x) over `images` (uint8): LDM's scale_by_std."""
    generator = torch.Generator().manual_seed(0)
    latents = [vae.encode(to_float(part).to(device)).sample(generator) for part in images.split(batch_size)]
    return 1.0 / torch.cat(latents).float().std().item()


class VAETrainer(Trainer):
    # train_step calls encode/decode and the discriminator directly, outside DistributedDataParallel
    single_process_reason = "autoencoder training (train-vae) runs in one process only"

    def load_data(self):
        if self.config.train.grad_accumulation != 1:
            raise ConfigError("train.grad_accumulation must be 1 for autoencoder training; raise train.batch_size instead")
        return load_dataset(self.config.data, self.progress)

    def build(self) -> torch.nn.Module:
        loss = self.config.vae_loss
        if loss.disc_weight > 0:
            disc = PatchDiscriminator(self.config.data.channels, loss.disc_channels, loss.disc_layers)
            self.disc = prepare_module(disc, self.device)
            self.extra_modules["discriminator"] = self.disc
        return AutoencoderKL.from_config(self.config.vae, self.config.data.channels)

    def extra_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"disc_optimizer": make_optimizer(self.disc.parameters(), self.config.train)} if "discriminator" in self.extra_modules else {}

    def grid_images(self) -> torch.Tensor:
        """The same GRID_IMAGES originals at every step, spread over the dataset."""
        fixed = torch.linspace(0, len(self.dataset) - 1, min(GRID_IMAGES, len(self.dataset))).round().long()
        return to_float(self.dataset.images[fixed])

    def next_batch(self) -> torch.Tensor:
        x = to_float(self.dataset.images[self.stream.next_indices()]).to(self.device)
        if self.config.data.hflip:
            flip = torch.rand(len(x), generator=self.generator, device=self.generator.device).to(self.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x

    def discriminator_on(self) -> bool:
        return self.config.vae_loss.disc_weight > 0 and self.step >= self.config.vae_loss.disc_start

    def train_step(self) -> dict[str, float]:
        lc = self.config.vae_loss
        x = self.next_batch()
        with self.autocast():
            posterior = self.net.encode(x)
            x_rec = self.net.decode(posterior.sample(self.generator))
            error = (x_rec.float() - x.float())
            rec = (lc.l1 * error.abs() + lc.l2 * error.pow(2)).flatten(1).sum(1).mean()
            kl = posterior.kl().mean()
            loss = rec + lc.kl * kl
            logs = {"rec_l1_per_pixel": error.abs().mean().item(), "kl": kl.item()}
            if self.discriminator_on():
                gan = -self.disc(x_rec).float().mean()
                weight = adaptive_weight(rec, gan, self.net.decoder.conv_out.weight)
                loss = loss + lc.disc_weight * weight * gan
                logs.update({"g_loss": gan.item(), "adaptive_weight": weight.item()})
        loss.backward()
        stepped = self.optimizer_step()
        if self.discriminator_on():
            # the generator's backward also reached the discriminator: its step must see only its own loss
            self.optimizers["disc_optimizer"].zero_grad(set_to_none=True)
            with self.autocast():
                d_loss = hinge_d_loss(self.disc(x).float(), self.disc(x_rec.detach()).float())
            d_loss.backward()
            self.optimizer_step("disc_optimizer", self.disc)
            logs["d_loss"] = d_loss.item()
        self.finish_step(len(x), stepped)
        return {"loss": loss.item(), **logs}

    def checkpoint_config(self) -> dict:
        """The config with the latent scale measured on the data with the EMA weights (also written to RUN/config.json)."""
        count = min(SCALE_IMAGES, len(self.dataset))
        idx = torch.linspace(0, len(self.dataset) - 1, count).round().long()
        scale = latent_scale(self.ema, self.dataset.images[idx], self.device)
        values = config_to_dict(replace(self.config, vae=replace(self.config.vae, scale_factor=scale)))
        write_json_atomic(self.run_dir / "config.json", values)
        return values

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.ema.decode(self.ema.encode(images.to(self.device)).mode()).clamp(-1, 1).cpu()

    def sample_grid(self) -> Path:
        """Originals (top rows) over their reconstructions by the EMA autoencoder."""
        originals = self.grid_images()
        rec = self.reconstruct(originals)
        return save_grid(torch.cat([originals, rec]), self.run_dir / "samples" / f"step_{self.step:08d}.png", ncols=min(8, len(rec)))

    def evaluate(self) -> dict:
        from diffusekit.evaluate import evaluate_reconstructions

        count = min(self.config.eval.n, len(self.dataset))
        idx = torch.linspace(0, len(self.dataset) - 1, count).round().long()
        originals = to_float(self.dataset.images[idx])
        rec = torch.cat([self.reconstruct(part) for part in originals.split(128)])
        return evaluate_reconstructions(rec, originals, features=self.config.eval.features or None)


def train_vae(config: Config, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Train the autoencoder of `config` into `run_dir` (a new run, or --resume the run there)."""
    return run_training(VAETrainer, replace(config, task="autoencoder"), run_dir, resume=resume, overwrite=overwrite, progress=progress)
