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
from diffusekit.trainer import Recipe, Trained, TrainResult, run_training

SCALE_IMAGES = 1024  # images encoded to measure the latent scale
GRID_IMAGES = 16


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, images: torch.Tensor, device, batch_size: int = 128) -> float:
    """1 / std of sampled latents z ~ q(z | x) over `images` (uint8): LDM's scale_by_std."""
    generator = torch.Generator().manual_seed(0)
    latents = [vae.encode(to_float(part).to(device)).sample(generator) for part in images.split(batch_size)]
    return 1.0 / torch.cat(latents).float().std().item()


class AutoencoderRecipe(Recipe):
    """The autoencoder trains (its EMA kept); with vae_loss.disc_weight > 0 a patch discriminator trains beside it."""

    # train_step calls encode/decode and the discriminator directly, outside DistributedDataParallel
    single_process_reason = "autoencoder training (train-vae) runs in one process only"

    def load_data(self):
        t = self.trainer
        if t.config.train.grad_accumulation != 1:
            raise ConfigError("train.grad_accumulation must be 1 for autoencoder training; raise train.batch_size instead")
        return load_dataset(t.config.data, t.progress)

    def build(self) -> Trained:
        t = self.trainer
        config, loss = t.config, t.config.vae_loss
        if loss.disc_weight <= 0:
            return Trained(prepare_module(AutoencoderKL.from_config(config.vae, config.data.channels), t.device))
        self.disc = prepare_module(PatchDiscriminator(config.data.channels, loss.disc_channels, loss.disc_layers), t.device)
        vae = prepare_module(AutoencoderKL.from_config(config.vae, config.data.channels), t.device)
        return Trained(vae, saved={"discriminator": self.disc}, optimizers={"disc_optimizer": make_optimizer(self.disc.parameters(), config.train)})

    def grid_images(self) -> torch.Tensor:
        """The same GRID_IMAGES originals at every step, spread over the dataset."""
        t = self.trainer
        fixed = torch.linspace(0, len(t.dataset) - 1, min(GRID_IMAGES, len(t.dataset))).round().long()
        return to_float(t.dataset.images[fixed])

    def next_batch(self) -> torch.Tensor:
        t = self.trainer
        x = to_float(t.dataset.images[t.state.stream.next_indices()]).to(t.device)
        if t.config.data.hflip:
            flip = torch.rand(len(x), generator=t.generator, device=t.generator.device).to(t.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x

    def discriminator_on(self) -> bool:
        t = self.trainer
        return t.config.vae_loss.disc_weight > 0 and t.state.step >= t.config.vae_loss.disc_start

    def train_step(self) -> dict[str, float]:
        t = self.trainer
        lc = t.config.vae_loss
        x = self.next_batch()
        with t.autocast():
            posterior = t.net.encode(x)
            x_rec = t.net.decode(posterior.sample(t.generator))
            error = (x_rec.float() - x.float())
            rec = (lc.l1 * error.abs() + lc.l2 * error.pow(2)).flatten(1).sum(1).mean()
            kl = posterior.kl().mean()
            loss = rec + lc.kl * kl
            logs = {"rec_l1_per_pixel": error.abs().mean().item(), "kl": kl.item()}
            if self.discriminator_on():
                gan = -self.disc(x_rec).float().mean()
                weight = adaptive_weight(rec, gan, t.net.decoder.conv_out.weight)
                loss = loss + lc.disc_weight * weight * gan
                logs.update({"g_loss": gan.item(), "adaptive_weight": weight.item()})
        loss.backward()
        stepped = t.optimizer_step()
        if self.discriminator_on():
            # the generator's backward also reached the discriminator: its step must see only its own loss
            t.optimizers["disc_optimizer"].zero_grad(set_to_none=True)
            with t.autocast():
                d_loss = hinge_d_loss(self.disc(x).float(), self.disc(x_rec.detach()).float())
            d_loss.backward()
            t.optimizer_step("disc_optimizer", self.disc)
            logs["d_loss"] = d_loss.item()
        t.finish_step(len(x), stepped)
        return {"loss": loss.item(), **logs}

    def checkpoint_config(self) -> dict:
        """The config with the latent scale measured on the data with the EMA weights (also written to RUN/config.json)."""
        t = self.trainer
        count = min(SCALE_IMAGES, len(t.dataset))
        idx = torch.linspace(0, len(t.dataset) - 1, count).round().long()
        scale = latent_scale(t.ema, t.dataset.images[idx], t.device)
        values = config_to_dict(replace(t.config, vae=replace(t.config.vae, scale_factor=scale)))
        write_json_atomic(t.run_dir / "config.json", values)
        return values

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        t = self.trainer
        return t.ema.decode(t.ema.encode(images.to(t.device)).mode()).clamp(-1, 1).cpu()

    def sample_grid(self) -> Path:
        """Originals (top rows) over their reconstructions by the EMA autoencoder."""
        t = self.trainer
        originals = self.grid_images()
        rec = self.reconstruct(originals)
        return save_grid(torch.cat([originals, rec]), t.run_dir / "samples" / f"step_{t.state.step:08d}.png", ncols=min(8, len(rec)))

    def evaluate(self) -> dict:
        t = self.trainer
        from diffusekit.evaluate import evaluate_reconstructions

        count = min(t.config.eval.n, len(t.dataset))
        idx = torch.linspace(0, len(t.dataset) - 1, count).round().long()
        originals = to_float(t.dataset.images[idx])
        rec = torch.cat([self.reconstruct(part) for part in originals.split(128)])
        return evaluate_reconstructions(rec, originals, features=t.config.eval.features or None)


def train_vae(config: Config, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Train the autoencoder of `config` into `run_dir` (a new run, or --resume the run there)."""
    return run_training(AutoencoderRecipe, replace(config, task="autoencoder"), run_dir, resume=resume, overwrite=overwrite, progress=progress)
