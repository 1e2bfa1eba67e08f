"""`diffusekit sample` and `diffusekit generate`: images (a grid or PNGs, and the reverse process as a GIF) from a model."""

from __future__ import annotations

from pathlib import Path

from diffusekit.cli.options import add_lora_option, add_sampling_args, apply_loras
from diffusekit.errors import UserError


def _sample(args) -> None:
    """`sample` and `generate`: images from a run, a checkpoint or a diffusers folder."""
    import torch

    from diffusekit.images import save_gif
    from diffusekit.models import default_model
    from diffusekit.pipeline import Pipeline
    from diffusekit.schedule import sigma_to_alpha_sigma

    check_image_outputs(Path(args.out), args.animate)
    pipe = Pipeline.from_pretrained(getattr(args, "checkpoint", None) or args.model or default_model(), weights=args.weights, device=args.device)
    apply_loras(pipe, args.lora)
    frames, shown = [], min(args.n, 64)

    def record(info) -> None:
        """Up to ~60 frames of the first batch: x_t on the DDPM scale, or a latent model's decoded x0_hat."""
        last, every = info["steps"] - 1, max(1, (info["steps"] - 1) // 60)
        if info["start"] == 0 and (info["i"] % every == 0 or info["i"] == last):
            if pipe.vae is not None:
                frames.append(pipe.decode(info["denoised"][:shown]))
            else:
                alpha, _ = sigma_to_alpha_sigma(info["sigma_next"].to(torch.float64))
                frames.append((info["x"][:shown] * alpha.float().to(info["x"].device)).clamp(-1, 1).cpu())

    images = pipe.sample(
        args.n, steps=args.steps, sampler=args.sampler, spacing=args.spacing, seed=args.seed, labels=args.label, prompts=args.prompt,
        negative=args.negative, guidance=args.guidance, guidance_rescale=args.guidance_rescale, eta=args.eta, batch_size=args.batch_size,
        size=args.size, callback=record if args.animate else None, progress=True,
    )
    _write_images(images, Path(args.out), "samples" if args.command == "sample" else "images")
    if args.animate:
        try:
            save_gif(frames, args.animate)
        except OSError as err:
            raise UserError(f"could not write the animation to '{args.animate}' ({err}); free some space or choose another --animate") from None
        print(f"wrote the reverse process ({len(frames)} frames) to {args.animate}")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def check_image_outputs(out: Path, animate: str | None) -> None:
    """Refuse, before any work, an --out (or --animate) that cannot be written as asked."""
    if out.suffix.lower() in IMAGE_SUFFIXES and out.is_dir():
        raise UserError(f"--out '{out}' is a folder; give a new file name for a grid, or a folder name without an image suffix for one PNG per image")
    if out.suffix.lower() not in IMAGE_SUFFIXES and out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is an existing file, not a folder; give a .png name for a grid, or a folder for one PNG per image")
    if animate and Path(animate).is_dir():
        raise UserError(f"--animate '{animate}' is a folder; give a .gif file name")


def _write_images(images, out: Path, noun: str) -> None:
    """A grid for an image file name, else one PNG per image into the folder `out`."""
    from diffusekit.images import save_grid, save_images

    try:
        if out.suffix.lower() in IMAGE_SUFFIXES:
            save_grid(images, out)
            print(f"wrote a grid of {len(images)} {noun} to {out}")
        else:
            save_images(images, out)
            print(f"wrote {len(images)} PNGs to {out}/")
    except OSError as err:
        raise UserError(f"could not write the {noun} to '{out}' ({err}); free some space or choose another --out "
                        "(the model and its checkpoints are untouched)") from None


def register(sub) -> None:
    p = sub.add_parser("sample", help="sample images from a run or checkpoint")
    p.add_argument("checkpoint", metavar="RUN_OR_CKPT")
    add_sampling_args(p, n=64, out="samples.png")
    add_lora_option(p)
    p.add_argument("--label", type=int, action="append", help="class label(s) for a class-conditional model (repeatable)")
    p.add_argument("--prompt", action="append", help="prompt(s) for a text-to-image model (repeatable; `generate` is the short way)")
    p.set_defaults(func=_sample)

    p = sub.add_parser("generate", help="text to image: images from a prompt")
    p.add_argument("prompt", nargs="+", help='the prompt, one argument: quote a prompt of several words ("a red apple"); '
                   'several prompts take turns over the --n images')
    p.add_argument("--model", help="a text-to-image run, checkpoint or diffusers folder (default: the shipped emoji demo model)")
    add_sampling_args(p, n=8, out="generated.png")
    add_lora_option(p)
    p.set_defaults(func=_sample, label=None)
