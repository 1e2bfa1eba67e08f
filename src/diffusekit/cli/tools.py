"""`diffusekit presets` and `diffusekit noise`: the built-in presets, and the forward process drawn on an image."""

from __future__ import annotations

from pathlib import Path

from diffusekit.cli.options import positive_int, seed_value
from diffusekit.schedule import BETA_SCHEDULES


def _presets(args) -> None:
    from diffusekit.config import load_preset, preset_names

    for name in preset_names():
        print(f"{name:16s} {load_preset(name).description}")


def _noise(args) -> None:
    import torch

    from diffusekit.config import DiffusionConfig
    from diffusekit.data import to_float
    from diffusekit.data.folder import load_image
    from diffusekit.images import atomic_save, make_grid, to_pil, upscale
    from diffusekit.schedule import NoiseSchedule

    schedule = NoiseSchedule.from_config(DiffusionConfig(schedule=args.schedule, timesteps=args.timesteps))
    x0 = to_float(torch.from_numpy(load_image(Path(args.image), args.size, args.channels).copy()))[None]
    ts = torch.linspace(0, schedule.num_timesteps - 1, args.frames).round().long()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed))
    strip = torch.cat([schedule.q_sample(x0, t[None], noise) for t in ts])
    atomic_save(upscale(to_pil(make_grid(strip, ncols=args.frames)), min_side=96), args.out)
    print(f"wrote the forward process at t = {', '.join(str(int(t)) for t in ts)} to {args.out}")


def register(sub) -> None:
    p = sub.add_parser("presets", help="list the built-in presets")
    p.set_defaults(func=_presets)

    p = sub.add_parser("noise", help="show the forward process on an image")
    p.add_argument("image")
    p.add_argument("--out", default="noise.png")
    p.add_argument("--frames", type=positive_int, default=8)
    p.add_argument("--size", type=positive_int, default=64)
    p.add_argument("--channels", type=int, choices=(1, 3), default=3)
    p.add_argument("--schedule", default="linear", choices=BETA_SCHEDULES)
    p.add_argument("--timesteps", type=positive_int, default=1000)
    p.add_argument("--seed", type=seed_value, default=0)
    p.set_defaults(func=_noise)
