"""`diffusekit train`, `train-vae` and `distill`: a run folder from a preset (or a teacher), or a run resumed."""

from __future__ import annotations

from pathlib import Path

from diffusekit.cli.options import add_run_options, positive_int
from diffusekit.errors import UserError


def _train(args) -> None:
    from diffusekit.config import apply_overrides, load_preset
    from diffusekit.distributed import launched_rank
    from diffusekit.io.checkpoint import latest_checkpoint, load_config

    if args.command == "train-vae":
        from diffusekit.autoencoder_training import train_vae as train
    else:
        from diffusekit.diffusion_training import train

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
    config = apply_overrides(config, args.set or [], {"train.budget": args.budget or None, "train.max_steps": args.steps})
    result = train(config, out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if launched_rank() == 0:  # under torchrun: once, not once per process
        print(f"run: {result.run_dir}  step {result.step}  checkpoint: {result.checkpoint}")
        print(f"samples: {result.run_dir / 'samples'}")


def _distill(args) -> None:
    from diffusekit.distill import distill
    from diffusekit.distributed import launched_rank

    if args.out is None and (args.teacher is None or args.resume):
        raise UserError("distill --resume needs --out, the distillation run to continue" if args.resume else
                        "distill needs the teacher run, e.g. `diffusekit distill runs/mnist --out runs/mnist-fast`")
    out = Path(args.out or f"runs/{Path(args.teacher).name}-{args.method or 'progressive'}")
    result = distill(args.teacher, out, method=args.method, steps=args.steps, budget=args.budget, train_steps=args.train_steps,
                     overrides=args.set or [], resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if launched_rank() == 0:
        print(f"run: {result.run_dir}  step {result.step}  checkpoint: {result.checkpoint}")
        print(f"sample it: diffusekit sample {result.run_dir} (its sampler and steps are the defaults)")


def register(sub) -> None:
    for name, what in (("train", "a diffusion model"), ("train-vae", "the autoencoder of a latent diffusion model")):
        p = sub.add_parser(name, help=f"train {what} from a preset")
        p.add_argument("--preset", help="a built-in preset (see `diffusekit presets`) or a .toml file")
        p.add_argument("--out", help="run folder (default runs/PRESET)")
        add_run_options(p)
        p.set_defaults(func=_train)

    p = sub.add_parser("distill", help="distill a trained model into a 1-4 step student (progressive or consistency distillation)")
    p.add_argument("teacher", metavar="RUN", nargs="?", help="the teacher: a diffusion run or checkpoint (not needed with --resume)")
    p.add_argument("--method", choices=("progressive", "consistency"), help="progressive (Salimans & Ho 2022; the default) or consistency (Song et al. 2023)")
    p.add_argument("--out", help="the student's run folder (default runs/TEACHER-METHOD)")
    p.add_argument("--steps", type=positive_int, help="network calls per image the student is made for (default 4; progressive: a power of two)")
    p.add_argument("--budget", help="wall-clock time to fill, e.g. 20m (the default without --train-steps)")
    p.add_argument("--train-steps", type=positive_int, help="optimizer steps in all (progressive: split evenly over its stages; with --resume: the new total)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. --set distill.start_steps=32 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the distillation in --out exactly where it stopped")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_distill)
