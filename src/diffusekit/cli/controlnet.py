"""`diffusekit train-controlnet`: a ControlNet for a text-to-image model, trained on a folder of captioned images."""

from __future__ import annotations

from pathlib import Path

from diffusekit.cli.options import add_run_options
from diffusekit.errors import UserError


def _train_controlnet(args) -> None:
    from diffusekit.controlnet_training import RUN_FOLDER, controlnet_config, train_controlnet
    from diffusekit.io.checkpoint import latest_checkpoint, load_config

    data, control = args.data, args.control
    if data is None or control is None:
        ckpt = latest_checkpoint(Path(args.out)) if args.resume and args.out else None
        if ckpt is None:
            raise UserError("train-controlnet needs --data FOLDER (captioned images) and --control canny|scribble|FOLDER")
        saved = load_config(ckpt)  # --resume: the run's own images and control
        data, control = data or saved.data.path, control or saved.controlnet.control
    out = Path(args.out or f"runs/controlnet-{Path(data).resolve().name}")
    flags = {"train.budget": args.budget or None, "train.max_steps": args.steps}
    config = controlnet_config(args.base, data, control, args.set or [], flags)
    result = train_controlnet(config, out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    model = f" --model {args.base}" if args.base else ""
    print(f"run: {result.run_dir}  step {result.step}  checkpoint: {result.checkpoint}")
    print(f"ControlNet: {result.run_dir / RUN_FOLDER} (diffusers' layout)  samples: {result.run_dir / 'samples'}")
    print(f'use it: diffusekit generate "PROMPT"{model} --controlnet {result.run_dir} --control CONTROL.png')


def register(sub) -> None:
    p = sub.add_parser("train-controlnet", help="train a ControlNet for a text-to-image model (only the ControlNet trains)")
    p.add_argument("base", metavar="BASE", nargs="?",
                   help="the model to steer: a diffusekit run or checkpoint, or a diffusers folder (default: the shipped demo model)")
    p.add_argument("--data", metavar="FOLDER", help="images with captions, as `train` reads them (metadata.jsonl or a .txt beside each image)")
    p.add_argument("--control", metavar="canny|scribble|FOLDER",
                   help="the control images: Canny edges or scribbles made from the images (OpenCV), or a folder of them with the same file names")
    p.add_argument("--out", help="run folder (default runs/controlnet-FOLDER)")
    add_run_options(p)  # --resume continues with the same BASE (it is checked)
    p.set_defaults(func=_train_controlnet)
