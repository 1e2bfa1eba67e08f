"""`diffusekit finetune`: a LoRA of a trained model on a folder of images, in a run folder."""

from __future__ import annotations

from pathlib import Path

from diffusekit.cli.options import add_run_options, positive_int
from diffusekit.errors import UserError


def _finetune(args) -> None:
    from diffusekit.finetune import finetune, finetune_config
    from diffusekit.io.checkpoint import latest_checkpoint, load_config
    from diffusekit.io.lora import RUN_FILE

    data = args.data
    if data is None:
        ckpt = latest_checkpoint(Path(args.out)) if args.resume and args.out else None
        if ckpt is None:
            raise UserError("finetune needs --data FOLDER (images with captions: metadata.jsonl or a .txt beside each image)")
        data = load_config(ckpt).data.path  # --resume: the run's own folder of images
    out = Path(args.out or f"runs/lora-{Path(data).resolve().name}")
    flags = {
        "finetune.rank": args.lora_rank, "finetune.prior_weight": args.prior_weight, "finetune.alpha": args.lora_alpha,
        "finetune.targets": [t.strip() for t in args.lora_targets.split(",") if t.strip()] if args.lora_targets else None,
        "finetune.text_encoder": args.text_encoder or None, "finetune.prior_prompts": args.prior_prompt or None,
        "finetune.prior_images": args.prior_images or None, "finetune.prior_path": args.prior_data, "train.budget": args.budget or None,
        "train.max_steps": args.steps,
    }
    config = finetune_config(args.base, data, args.set or [], flags)
    result = finetune(config, out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    model = f" --model {args.base}" if args.base else ""
    use = f'generate "PROMPT"{model}' if config.text.encoder else f"sample {args.base}"
    print(f"run: {result.run_dir}  step {result.step}  checkpoint: {result.checkpoint}")
    print(f"LoRA: {result.run_dir / RUN_FILE}  samples: {result.run_dir / 'samples'}")
    print(f"use it: diffusekit {use} --lora {result.run_dir}")


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a trained model on a folder of images with a LoRA (only the LoRA trains)")
    p.add_argument("base", metavar="BASE", nargs="?",
                   help="the model to fine-tune: a diffusekit run or checkpoint, or a diffusers / Stable Diffusion folder (default: the shipped demo model)")
    p.add_argument("--data", metavar="FOLDER", help="images with captions, as `train` reads them (metadata.jsonl or a .txt beside each image)")
    p.add_argument("--out", help="run folder (default runs/lora-FOLDER)")
    p.add_argument("--lora-rank", type=positive_int, help="rank r of each low-rank update (default 8: finetune.rank)")
    p.add_argument("--lora-alpha", type=float, help="alpha: the update is (alpha / r) B A (default: alpha = r)")
    p.add_argument("--lora-targets", metavar="LIST",
                   help="layers to adapt: presets attention (default), ff, proj, conv, or module-name suffixes, comma-separated")
    p.add_argument("--text-encoder", action="store_true", help="also train a LoRA on the text encoder's attention")
    p.add_argument("--prior-prompt", action="append", metavar="TEXT",
                   help="prior preservation (DreamBooth): a class prompt the base model draws --prior-images for (repeatable)")
    p.add_argument("--prior-images", type=positive_int, help="how many class images the base model generates before training")
    p.add_argument("--prior-data", metavar="DIR", help="or a folder of class images (with captions, or one --prior-prompt for all)")
    p.add_argument("--prior-weight", type=float, help="weight lambda of the class images' loss (default 1: finetune.prior_weight)")
    add_run_options(p)  # --resume continues with the same BASE (it is checked)
    p.set_defaults(func=_finetune)
