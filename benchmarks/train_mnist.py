"""Train the `mnist` preset for a time budget and record speed and the loss curve as JSON.

    python benchmarks/train_mnist.py --budget 10m --out runs/bench_mnist --json benchmarks/results/train_mnist.json

Speed is reported as images/s and, measured in the same process just before the
run, as a ratio against a reference: the same training step on diffusers'
UNet2DModel built with the same shape (when diffusers is installed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from diffusekit.config import apply_overrides, load_preset
from diffusekit.devices import prepare_module, use_all_cores
from diffusekit.diffusion_training import train
from diffusekit.durations import parse_duration
from diffusekit.losses import diffusion_loss
from diffusekit.models import build_net
from diffusekit.schedule import NoiseSchedule


def diffusers_twin(config):
    """diffusers' UNet2DModel with the same blocks as diffusekit's U-Net for `config` (None without diffusers)."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        return None
    m = config.model
    levels = range(len(m.channels))
    return UNet2DModel(
        sample_size=config.data.image_size, in_channels=config.data.channels, out_channels=config.data.channels,
        block_out_channels=tuple(m.channels), layers_per_block=m.layers_per_block, norm_num_groups=m.norm_groups,
        attention_head_dim=m.attention_head_dim, add_attention=m.mid_attention,
        down_block_types=tuple("AttnDownBlock2D" if i in m.attention_levels else "DownBlock2D" for i in levels),
        up_block_types=tuple("AttnUpBlock2D" if i in m.attention_levels else "UpBlock2D" for i in reversed(levels)),
    )


def steps_per_second(net, config, forward, steps: int = 20, warmup: int = 3) -> float:
    """Training steps/s of `net` on random data of the config's shape (the trainer's loss and optimizer)."""
    schedule = NoiseSchedule.from_config(config.diffusion)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x0 = torch.randn(config.train.batch_size, config.data.channels, config.data.image_size, config.data.image_size)
    gen = torch.Generator().manual_seed(0)
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        loss = diffusion_loss(forward, schedule, x0, prediction=config.diffusion.prediction, generator=gen)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return steps / (time.perf_counter() - start)


def reference_ratio(config) -> dict:
    ours = prepare_module(build_net(config), torch.device("cpu"))
    result = {"diffusekit_images_per_s": steps_per_second(ours, config, ours) * config.train.batch_size}
    twin = diffusers_twin(config)
    if twin is not None:
        ref = steps_per_second(twin, config, lambda x, t: twin(x, t).sample)
        result["diffusers_unet2dmodel_images_per_s"] = ref * config.train.batch_size
        result["speed_ratio_vs_diffusers"] = result["diffusekit_images_per_s"] / result["diffusers_unet2dmodel_images_per_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="10m")
    parser.add_argument("--preset", default="mnist")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", default="runs/bench_mnist")
    parser.add_argument("--json", default="benchmarks/results/train_mnist.json")
    args = parser.parse_args()

    threads = use_all_cores()
    config = apply_overrides(load_preset(args.preset), [*args.set, f'train.budget="{args.budget}"'])
    reference = reference_ratio(config)
    start = time.perf_counter()
    result = train(config, args.out, overwrite=True, progress=sys.stderr.isatty())
    wall = time.perf_counter() - start
    curve = [json.loads(line) for line in (Path(args.out) / "metrics.jsonl").read_text().splitlines()]
    report = {
        "preset": args.preset,
        "overrides": args.set,
        "budget_s": parse_duration(args.budget),
        "wall_s": wall,
        "train_seconds": result.train_seconds,
        "steps": result.step,
        "images_per_s": result.images_per_second,
        "stopped_by": result.stopped_by,
        "final_loss": result.last_loss,
        "loss_curve": [[r["step"], r["loss"]] for r in curve],
        "reference_same_process": reference,
        "checkpoint": str(result.checkpoint),
        "sample_grid": str(Path(args.out) / "samples" / f"step_{result.step:08d}.png"),
        "machine": {"threads": threads, "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "loss_curve"}, indent=2))


if __name__ == "__main__":
    main()
