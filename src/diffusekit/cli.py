"""`diffusekit` commands: train, train-vae, sample, generate, eval, info, export, slim, presets, noise.

Mistakes a user can make (UserError) are printed as one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from diffusekit.errors import DiffusekitWarning, UserError
from diffusekit.samplers import SAMPLERS
from diffusekit.schedule import BETA_SCHEDULES, SPACINGS


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


def _sample(args) -> None:
    """`sample` and `generate`: images from a run, a checkpoint or a diffusers folder."""
    import torch

    from diffusekit.images import save_gif
    from diffusekit.models import default_model
    from diffusekit.pipeline import Pipeline
    from diffusekit.schedule import sigma_to_alpha_sigma

    check_image_outputs(Path(args.out), args.animate)
    pipe = Pipeline.from_pretrained(getattr(args, "checkpoint", None) or args.model or default_model(), weights=args.weights, device=args.device)
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


def _eval(args) -> None:
    from diffusekit.evaluate import default_report_path, evaluate_checkpoint, evaluate_images, format_report, write_report

    if (args.checkpoint is None) == (args.images is None):
        raise UserError("eval takes either a run/checkpoint or --images DIR (not both)")
    weights = args.inception_weights
    if args.images:
        from diffusekit.data import to_float
        from diffusekit.data.folder import load_folder

        reference = args.ref or "mnist"
        size, channels = (28, 1) if reference == "mnist" else (args.size or 64, 3)
        images, _, _ = load_folder(args.images, size, channels)
        report = evaluate_images(to_float(images), reference, args.features, weights)
        out = Path(args.json or "eval.json")
    else:
        report = evaluate_checkpoint(
            args.checkpoint, n=args.n, sampler=args.sampler, steps=args.steps, spacing=args.spacing, seed=args.seed,
            guidance=args.guidance, reference=args.ref, features=args.features, weights=weights, device=args.device,
        )
        out = Path(args.json) if args.json else default_report_path(report)
    print(format_report(report))
    print(f"wrote {write_report(report, out)}")


def _info(args) -> None:
    from diffusekit.config import config_to_dict
    from diffusekit.files import read_json
    from diffusekit.io.checkpoint import check_intact, load_config, resolve_checkpoint
    from diffusekit.models import build_unet, build_vae

    ckpt = resolve_checkpoint(args.checkpoint)
    check_intact(ckpt)
    config = load_config(ckpt)
    state = read_json(ckpt / "state.json", "training state")
    autoencoder = config.task == "autoencoder"
    params = sum(p.numel() for p in (build_vae(config) if autoencoder else build_unet(config)).parameters())
    info = {
        "checkpoint": str(ckpt),
        "step": state.get("step"),
        "images_seen": state.get("images_seen"),
        "train_seconds": round(state.get("train_seconds", 0.0), 1),
        "parameters": params,
        "has_ema": (ckpt / "ema.safetensors").is_file(),
        "config": config_to_dict(config),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    m, d, data, v = config.model, config.diffusion, config.data, config.vae
    print(f"checkpoint   {ckpt}")
    print(f"trained      {info['step']} steps, {info['images_seen']} images, {info['train_seconds']} s")
    vae_line = (f"KL autoencoder, widths {list(v.channels)}, {v.latent_channels} latent channels, "
                f"{v.downsample_factor}x smaller latents, latent scale {v.scale_factor:.4g}")
    if autoencoder:
        print(f"model        {vae_line}; {params / 1e6:.2f}M parameters")
        print(f"data         {data.dataset}{' ' + data.path if data.path else ''}, {data.channels} x {data.image_size} x {data.image_size}")
        return
    if config.latent.vae:
        print(f"latent       {vae_line} (from {config.latent.vae})")
    print(f"model        U-Net {params / 1e6:.2f}M parameters; widths {list(m.channels)}, {m.layers_per_block} resnet(s)/level, "
          f"attention at levels {list(m.attention_levels)}, {'class-conditional (' + str(m.num_classes) + ')' if m.num_classes else 'unconditional'}")
    print(f"diffusion    {d.schedule} schedule, T = {d.timesteps}, predicts {d.prediction}, {d.loss_weighting} loss weighting"
          + (", zero terminal SNR" if d.zero_terminal_snr else ""))
    print(f"data         {data.dataset}{' ' + data.path if data.path else ''}, {data.channels} x {data.image_size} x {data.image_size}")
    print(f"sampling     {config.sample.sampler}, {config.sample.steps} steps, {config.sample.spacing} spacing (defaults)")


def _export(args) -> None:
    from diffusekit.io.diffusers_export import export_diffusers

    components = [c.strip() for c in args.components.split(",") if c.strip()] if args.components else None
    for note in export_diffusers(args.checkpoint, args.out, components=components, weights=args.weights):
        print(f"note: {note}")
    print(f"wrote a diffusers folder to {args.out}")


def _slim(args) -> None:
    from diffusekit.io.checkpoint import write_sampling_checkpoint

    out = write_sampling_checkpoint(args.checkpoint, args.out, half=args.half)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote a sampling-only checkpoint to {out} ({size / 2**20:.1f} MiB)")


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


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seed_value(text: str) -> int:
    """--seed: a whole number torch can seed with (config_checks.check_seed)."""
    from diffusekit.config_checks import check_seed
    from diffusekit.errors import ConfigError

    try:
        value = int(text)
        check_seed("--seed", value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def add_sampling_args(p: argparse.ArgumentParser, n: int, out: str) -> None:
    """The options `sample` and `generate` share."""
    p.add_argument("--n", type=positive_int, default=n, help="number of images")
    p.add_argument("--steps", type=positive_int, help="network evaluations (default: the model's sample.steps)")
    p.add_argument("--sampler", choices=SAMPLERS, metavar="NAME", help=f"the sampler: {', '.join(SAMPLERS)} (default: the model's sample.sampler)")
    p.add_argument("--schedule", "--spacing", dest="spacing", choices=SPACINGS, metavar="NAME",
                   help=f"the step schedule: {', '.join(SPACINGS)} (default: the model's sample.spacing)")
    p.add_argument("--eta", type=float, help="noise of ddim / euler_ancestral / dpmpp_2m_sde (0 deterministic)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's sample.guidance; 1: none)")
    p.add_argument("--guidance-rescale", type=float, help="guidance rescale phi in [0, 1] (Lin et al. 2023)")
    p.add_argument("--negative", help="a negative prompt: what guidance steers away from (text-to-image models)")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--size", type=positive_int, help="image size in pixels (default: the size the model was trained at)")
    p.add_argument("--out", default=out, help="a .png grid, or a folder for one PNG per image")
    p.add_argument("--animate", metavar="GIF", help="also write the reverse process as an animated GIF")
    p.add_argument("--batch-size", type=positive_int, help="images sampled at once (default: the model's sample.batch_size, 64); the images do not depend on it")
    p.add_argument("--weights", choices=("ema", "model"), default="ema")
    p.add_argument("--device", default="auto")


class Parser(argparse.ArgumentParser):
    """argparse with diffusekit's one-line errors: "error: ..." on stderr and exit code 2, no usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="diffusekit", description="Train and sample diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, what in (("train", "a diffusion model"), ("train-vae", "the autoencoder of a latent diffusion model")):
        p = sub.add_parser(name, help=f"train {what} from a preset")
        p.add_argument("--preset", help="a built-in preset (see `diffusekit presets`) or a .toml file")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. --set train.lr=2e-4 (repeatable)")
        p.add_argument("--out", help="run folder (default runs/PRESET)")
        p.add_argument("--budget", help="stop after this much wall-clock time, e.g. 10m, 90s, 1h30m")
        p.add_argument("--steps", type=positive_int, help="stop after this many optimizer steps (train.max_steps)")
        p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
        p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.set_defaults(func=_train)

    p = sub.add_parser("sample", help="sample images from a run or checkpoint")
    p.add_argument("checkpoint", metavar="RUN_OR_CKPT")
    add_sampling_args(p, n=64, out="samples.png")
    p.add_argument("--label", type=int, action="append", help="class label(s) for a class-conditional model (repeatable)")
    p.add_argument("--prompt", action="append", help="prompt(s) for a text-to-image model (repeatable; `generate` is the short way)")
    p.set_defaults(func=_sample)

    p = sub.add_parser("generate", help="text to image: images from a prompt")
    p.add_argument("prompt", nargs="+", help='the prompt, one argument: quote a prompt of several words ("a red apple"); '
                   'several prompts take turns over the --n images')
    p.add_argument("--model", help="a text-to-image run, checkpoint or diffusers folder (default: the shipped emoji demo model)")
    add_sampling_args(p, n=8, out="generated.png")
    p.set_defaults(func=_sample, label=None)

    p = sub.add_parser("eval", help="measure sample quality (FD, KID, precision/recall, digit labels)")
    p.add_argument("checkpoint", metavar="RUN_OR_CKPT", nargs="?")
    p.add_argument("--images", metavar="DIR", help="evaluate a folder of images instead of sampling")
    p.add_argument("--ref", help="reference set: mnist, emoji or an image folder (default: the run's training data)")
    p.add_argument("--features", choices=("mnist", "inception", "random"), help="feature network (default: mnist for digits, else random)")
    p.add_argument("--inception-weights", metavar="PATH", help="local Inception-v3 FID weights (or set DIFFUSEKIT_INCEPTION_WEIGHTS)")
    p.add_argument("--n", type=positive_int, default=2000, help="number of samples")
    p.add_argument("--sampler", choices=SAMPLERS, metavar="NAME", help=f"the sampler: {', '.join(SAMPLERS)} (default: the run's eval.sampler)")
    p.add_argument("--steps", type=positive_int, help="network evaluations (default: the run's eval.steps)")
    p.add_argument("--schedule", "--spacing", dest="spacing", choices=SPACINGS, metavar="NAME",
                   help=f"the step schedule: {', '.join(SPACINGS)} (default: the run's sample.spacing)")
    p.add_argument("--guidance", type=float, help="guidance scale for conditional models")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--size", type=positive_int, help="with --images and a folder reference: the size both are compared at (default 64)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="where to write the JSON report (default: RUN/eval/...)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("info", help="describe a checkpoint")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_info)

    p = sub.add_parser("export", help="write a run as a diffusers folder (DDPMPipeline or Stable Diffusion layout)")
    p.add_argument("checkpoint", metavar="RUN_OR_CKPT")
    p.add_argument("out", metavar="OUT", help="a new folder")
    p.add_argument("--format", choices=("diffusers",), default="diffusers")
    p.add_argument("--components", help="write only these parts, e.g. unet,vae (of unet, vae, text_encoder, scheduler), without model_index.json")
    p.add_argument("--weights", choices=("ema", "model"), default="ema")
    p.set_defaults(func=_export)

    p = sub.add_parser("slim", help="copy a checkpoint with only what sampling needs (EMA weights, VAE, config)")
    p.add_argument("checkpoint", metavar="RUN_OR_CKPT")
    p.add_argument("out", metavar="OUT", help="a folder")
    p.add_argument("--half", action="store_true", help="store the weights in float16 (half the size)")
    p.set_defaults(func=_slim)

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
    return parser


def print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """diffusekit's warnings as one 'warning: ...' line between progress-bar updates; others as Python prints them."""
    if not issubclass(category, DiffusekitWarning):
        return DEFAULT_SHOWWARNING(message, category, filename, lineno, file, line)
    from tqdm.auto import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


DEFAULT_SHOWWARNING = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error already printed as one "error:" line
        return stop.code if isinstance(stop.code, int) else 2
    with warnings.catch_warnings():
        warnings.simplefilter("always", DiffusekitWarning)  # every one, as they happen
        warnings.showwarning = print_warning
        return run_command(args)


def run_command(args) -> int:
    try:
        args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the machine's, not ours: a full disk, a missing permission, a vanished file
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
