"""Latent against pixel diffusion on the emoji dataset, and the autoencoder's reconstruction quality.

    python benchmarks/latent_vs_pixel.py --vae runs/emoji-vae --budget 5m --json benchmarks/results/latent_vs_pixel.json

1. The VAE: PSNR, SSIM and reconstruction FD over all emoji (EMA weights, posterior mean).
2. Speed per step, measured in this process: the same U-Net recipe (unconditional, emoji-ldm's
   widths) on 32 x 32 x 3 pixels and on the 8 x 8 x 4 latents, same batch size.
3. Per unit of quality: both trained for the same wall-clock budget, then FD (fixed random conv
   features, 1,000 samples against all emoji, latent samples decoded).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffusekit.config import apply_overrides, load_preset
from diffusekit.data import load_dataset, to_float
from diffusekit.devices import prepare_module, use_all_cores
from diffusekit.diffusion_training import resolve_latent_config, train
from diffusekit.evaluate import evaluate_checkpoint, evaluate_reconstructions
from diffusekit.losses import diffusion_loss
from diffusekit.models import build_net, image_shape
from diffusekit.schedule import NoiseSchedule

UNCONDITIONAL = ['text.encoder=""', "model.cross_attention_dim=0", "sample.guidance=1.0"]


def configs(vae: str, budget: str):
    base = load_preset("emoji-ldm")
    common = [*UNCONDITIONAL, f'train.budget="{budget}"', "train.checkpoint_every=100000"]
    latent = resolve_latent_config(apply_overrides(base, [*common, f'latent.vae="{vae}"']))
    pixel = apply_overrides(base, [*common, 'latent.vae=""'])
    return {"pixel": pixel, "latent": latent}


def steps_per_second(config, steps: int = 20) -> float:
    net = prepare_module(build_net(config), torch.device("cpu"))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    schedule = NoiseSchedule.from_config(config.diffusion)
    x0 = torch.randn(config.train.batch_size, *image_shape(config))
    for i in range(steps + 3):
        if i == 3:
            start = time.perf_counter()
        diffusion_loss(net, schedule, x0).backward()
        opt.step()
        opt.zero_grad()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", default="runs/emoji-vae")
    parser.add_argument("--budget", default="5m")
    parser.add_argument("--out", default="runs/latent_vs_pixel")
    parser.add_argument("--json", default="benchmarks/results/latent_vs_pixel.json")
    args = parser.parse_args()

    use_all_cores()
    cfgs = configs(args.vae, args.budget)
    report = {"vae": args.vae, "budget": args.budget}

    vae_pipe_config = cfgs["latent"]
    data = load_dataset(vae_pipe_config.data, progress=False)
    from diffusekit.io.checkpoint import load_weights, resolve_checkpoint
    from diffusekit.models import build_vae
    from diffusekit.nn.state import load_state_dict_checked

    vae = build_vae(vae_pipe_config).eval()
    load_state_dict_checked(vae, load_weights(resolve_checkpoint(args.vae), "ema"), args.vae)
    originals = to_float(data.images)
    with torch.no_grad():
        rec = torch.cat([vae.decode(vae.encode(part).mode()).clamp(-1, 1) for part in originals.split(128)])
    report["reconstruction"] = evaluate_reconstructions(rec, originals)
    print(json.dumps(report["reconstruction"]), flush=True)

    speed = {name: steps_per_second(cfg) for name, cfg in cfgs.items()}
    report["steps_per_second"] = speed
    report["latent_speedup_per_step"] = speed["latent"] / speed["pixel"]
    print(json.dumps(speed), flush=True)

    for name, cfg in cfgs.items():
        result = train(cfg, Path(args.out) / name, overwrite=True, progress=False)
        quality = evaluate_checkpoint(Path(args.out) / name, n=1000, sampler="dpmpp_2m", steps=20, features="random")
        report[name] = {"steps": result.step, "images_per_s": result.images_per_second, "fd_random": quality["fd"],
                        "precision": quality["precision"], "recall": quality["recall"], "seconds_per_image": quality["seconds_per_image"]}
        print(name, json.dumps(report[name]), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
