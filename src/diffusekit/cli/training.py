"""`diffusekit train` and `diffusekit train-vae`: a run folder from a preset, or a run resumed."""

from __future__ import annotations

import json
from pathlib import Path

from diffusekit.cli.options import add_run_options
from diffusekit.errors import UserError


def _train(args) -> None:
    from diffusekit.config import apply_overrides, load_preset
    from diffusekit.distributed import launched_rank
    from diffusekit.io.checkpoint import latest_checkpoint, load_config

    if args.command == "train-vae":
        from diffusekit.train_vae import train_vae as train
    else:
        from diffusekit.train import train

    if args.preset is None and not (args.resume and args.out):
        raise UserError("train needs --preset NAME (see `diffusekit presets`), or --resume with --out of an existing run")
    out = Path(args.out or f"runs/{Path(args.preset).stem}")
    if args.preset is None:  # --resume alone: continue with the run's own config
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise UserError(f"nothing to resume in '{out}': it has no complete checkpoint")
        config = load_config(ckpt)
    else:
        config = load_preset(args.preset)
    overrides = list(args.set or [])
    if args.budget:
        overrides.append(f"train.budget={json.dumps(args.budget)}")
    if args.steps is not None:
        overrides.append(f"train.max_steps={args.steps}")
    config = apply_overrides(config, overrides)
    result = train(config, out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if launched_rank() == 0:  # under torchrun: once, not once per process
        print(f"run: {result.run_dir}  step {result.step}  checkpoint: {result.checkpoint}")
        print(f"samples: {result.run_dir / 'samples'}")


def register(sub) -> None:
    for name, what in (("train", "a diffusion model"), ("train-vae", "the autoencoder of a latent diffusion model")):
        p = sub.add_parser(name, help=f"train {what} from a preset")
        p.add_argument("--preset", help="a built-in preset (see `diffusekit presets`) or a .toml file")
        p.add_argument("--out", help="run folder (default runs/PRESET)")
        add_run_options(p)
        p.set_defaults(func=_train)
