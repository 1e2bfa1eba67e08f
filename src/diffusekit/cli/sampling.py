"""`diffusekit sample`, `generate` and `edit`: images (a grid or PNGs that carry their parameters, and the
reverse process as a GIF) from a model; `--from IMAGE.png` makes an image again from the parameters it carries."""

from __future__ import annotations

import re
from pathlib import Path

from diffusekit.cli.options import add_control_options, add_lora_option, add_sampling_args, apply_loras, control_arguments, describe_speed, positive_int
from diffusekit.config_checks import check_mask_blur
from diffusekit.errors import UserError, warn


def _sample(args) -> None:
    """`sample`, `generate` and `edit`: images from a run, a checkpoint or a diffusers folder."""
    from diffusekit.image_info import describe
    from diffusekit.images import image_tensor, mask_tensor, open_image, save_gif
    from diffusekit.models import default_model
    from diffusekit.pipeline import Pipeline

    recorded = read_from(args)
    check_image_outputs(args)
    pipe = Pipeline.from_pretrained(getattr(args, "checkpoint", None) or args.model or default_model(), weights=args.weights, device=args.device,
                                    dtype=args.precision, compile=args.compile, config=args.config, overrides=args.set or ())
    apply_loras(pipe, args.lora)
    control = control_arguments(pipe, args)
    if recorded is not None and "ControlNet 0" in recorded and not control:
        warn(f"'{args.source}' was made with a ControlNet ({recorded['ControlNet 0']}); give --controlnet and --control to make it again")
    if recorded is not None:
        check_recorded_model(recorded, pipe, args.source)
    check_arguments(args, pipe)
    attention = attention_collector(args, pipe)
    edit = {}
    if args.command == "edit":
        size = args.size or pipe.config.data.image_size
        init = open_image(Path(args.init), "init image")
        edit = {"image": image_tensor(init, size, pipe.config.data.channels), "strength": args.strength,
                "jump_length": args.jump_length, "jump_n_sample": args.jump_n_sample}
        if args.mask:
            edit["mask"] = mask_tensor(open_image(Path(args.mask), "mask"), init, size, args.mask_blur)
    frames, shown = [], min(args.n, 64)

    def record(info) -> None:
        """Up to ~60 frames of the first batch: x_t on the process's own scale, or a latent model's decoded x0_hat."""
        last, every = info["steps"] - 1, max(1, (info["steps"] - 1) // 60)
        if info["start"] == 0 and (info["i"] % every == 0 or info["i"] == last):
            frames.append(pipe.preview(info, shown, noisy=True))

    chosen = dict(steps=args.steps, sampler=args.sampler, spacing=args.spacing, seed=args.seed, labels=args.label, prompts=args.prompt or None,
                  negative=args.negative, guidance=args.guidance, guidance_rescale=args.guidance_rescale, eta=args.eta, size=args.size,
                  first_index=args.index)
    images = pipe.sample(args.n, **chosen, **edit, **control, batch_size=args.batch_size, callback=record if args.animate else None, progress=True,
                         attention=attention)
    texts = describe(pipe, args.n, **chosen, **{k: v for k, v in edit.items() if k not in ("image", "mask")}, edit=bool(edit),
                     masked="mask" in edit, **control, mask_blur=getattr(args, "mask_blur", None))
    _write_images(images, Path(args.out), "samples" if args.command == "sample" else "images", texts, args.index)
    last = args.index + args.n - 1
    print(f"seed {pipe.settings(seed=args.seed).seed}, images {args.index}..{last}: any one of them again alone with "
          f"--seed S --index I --n 1, or with --from its PNG")
    print(describe_speed(pipe, args.precision))
    if args.animate:
        try:
            save_gif(frames, args.animate)
        except OSError as err:
            raise UserError(f"could not write the animation to '{args.animate}' ({err}); free some space or choose another --animate") from None
        print(f"wrote the reverse process ({len(frames)} frames) to {args.animate}")
    if attention is not None:
        write_attention_maps(images, attention.result(), args.attention_maps)


def attention_collector(args, pipe):
    """With --attention-maps: the collector of the prompt's cross-attention maps, checked before any work."""
    from diffusekit.attention_maps import AttentionCollector

    words = [w for w in (getattr(args, "attention_words", None) or "").split(",") if w.strip()]
    if not getattr(args, "attention_maps", None):
        if words:
            raise UserError("--attention-words picks the words of --attention-maps FILE.png; add that option")
        return None
    return AttentionCollector(pipe, args.prompt, words)


def write_attention_maps(images, attention, path: str) -> None:
    from diffusekit.attention_maps import draw_attention
    from diffusekit.images import atomic_save

    try:
        atomic_save(draw_attention(images, attention), path)
    except OSError as err:
        raise UserError(f"could not write the attention maps to '{path}' ({err}); free some space or choose another --attention-maps") from None
    shown = f" (the first {min(len(images), 8)} images)" if len(images) > 8 else ""
    print(f"wrote the cross-attention maps of {', '.join(map(repr, attention.tokens))}{shown} to {path}")


# what `--from IMAGE.png` takes from the image's parameters where the command line does not say: option -> field
FROM_FIELDS = {"steps": "Steps", "sampler": "Sampler", "spacing": "Schedule type", "guidance": "CFG scale", "guidance_rescale": "Guidance rescale",
               "eta": "Eta", "seed": "Seed", "index": "Image index", "strength": "Denoising strength", "mask_blur": "Mask blur",
               "jump_length": "Jump length", "jump_n_sample": "Jump samples", "precision": "Precision"}


FLOAT_OPTIONS = ("guidance", "guidance_rescale", "eta", "strength", "mask_blur")


def read_from(args) -> dict | None:
    """With --from: fill every option the command line left unset from the image's parameters; else the defaults."""
    source, recorded = getattr(args, "source", None), None
    if source is None and args.command == "generate" and not args.prompt:
        raise UserError("generate needs a prompt (quote a prompt of several words), or --from IMAGE.png")
    if source is not None:
        recorded = read_recorded(args, Path(source))
    for option, default in UNSET_DEFAULTS.items():
        if getattr(args, option, default) is None:
            setattr(args, option, default)
    if args.n is None:
        args.n = 1 if source is not None else DEFAULT_N[args.command]
    if args.command == "edit":
        check_mask_blur(args.mask_blur)
    return recorded


def check_arguments(args, pipe) -> None:
    """The size and sampling settings asked for (by flags or --from), checked against the model before anything is allocated."""
    from diffusekit.inpaint import default_strength, strength_start

    settings = pipe.settings(n=args.n, steps=args.steps, sampler=args.sampler, spacing=args.spacing, seed=args.seed, guidance=args.guidance,
                             guidance_rescale=args.guidance_rescale, eta=args.eta, batch_size=args.batch_size)
    pipe.sampler_options(settings, args.eta, None)
    if args.size is not None:
        pipe.check_size(args.size, settings, getattr(args, "size_from", None) or f"--size {args.size}")
    if args.command == "edit":
        strength_start(settings.steps, default_strength(args.strength, bool(args.mask)))


DEFAULT_N = {"sample": 64, "generate": 8, "edit": 1}


# options whose defaults are None in `generate` and `edit`, so that --from can tell which ones the command line set
UNSET_DEFAULTS = {"seed": 0, "index": 0, "mask_blur": 0.0, "jump_length": 10, "jump_n_sample": 1, "precision": "auto"}


def read_recorded(args, source: Path) -> dict:
    from diffusekit.images import read_parameters

    recorded = read_parameters(Path(source))
    edited = "Denoising strength" in recorded
    if edited and args.command != "edit":
        raise UserError(f"'{source}' was made by `edit` from an init image; make it again with "
                        f"`diffusekit edit INIT.png --from {source}`{' --mask MASK.png' if 'Mask blur' in recorded else ''}")
    if args.command == "edit" and not edited:
        raise UserError(f"'{source}' was made from a prompt, not from an init image; use `diffusekit generate --from {source}`")
    args.prompt = args.prompt or ([recorded["prompt"]] if recorded["prompt"] else None)
    args.negative = args.negative if args.negative is not None else recorded["negative"] or None
    for option, field in FROM_FIELDS.items():
        if getattr(args, option, "not an option here") is None and field in recorded:
            kind = str if option in ("sampler", "spacing", "precision") else float if option in FLOAT_OPTIONS else int
            value = recorded[field]
            if not isinstance(value, (int, float) if kind is float else kind) or isinstance(value, bool) or (kind is int and value < 0):
                what = {int: "whole number >= 0", float: "number", str: "name"}[kind]
                raise UserError(f"'{source}' records {field}: {value!r}, which is not a {what}; fix it or give the option yourself")
            setattr(args, option, value)
    if args.label is None and isinstance(recorded.get("Label"), int):
        args.label = [recorded["Label"]]
    if args.size is None and "Size" in recorded:
        args.size, args.size_from = recorded_size(recorded["Size"], source), f"the Size {recorded['Size']} that '{source}' records"
    return recorded


def recorded_size(value, source) -> int:
    """A PNG's "Size: WxH" as the one side of a square image (its range is checked with the model: check_arguments)."""
    found = re.fullmatch(r"(\d{1,9})x(\d{1,9})", str(value).strip())
    if found is None:
        raise UserError(f"'{source}' records Size: {str(value)[:40]!r}, which is not WIDTHxHEIGHT in pixels (e.g. 32x32); "
                        "fix it or give --size yourself")
    if found[1] != found[2]:
        raise UserError(f"'{source}' records Size: {value}, which is not square; diffusekit makes square images: give --size yourself")
    return int(found[1])


def check_recorded_model(recorded: dict, pipe, source) -> None:
    from diffusekit.errors import warn

    made_by = recorded.get("Model hash")
    if made_by is not None and str(made_by) != pipe.fingerprint:
        loras = f" with the LoRAs {recorded['LoRA']} (--lora FILE:SCALE each)" if recorded.get("LoRA") else ""
        warn(f"'{source}' was made by the model {recorded.get('Model', '?')}{loras} (hash {made_by}), not by this one ({pipe.name}, hash "
             f"{pipe.fingerprint}): the image will differ; pass that model with --model{' and the LoRAs with --lora' if loras else ''}")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def check_image_outputs(args) -> None:
    """Refuse, before any work, an --out (or --animate) that cannot be written as asked, that would replace a file
    without --overwrite, or that is an input of this command (init image, mask, --from PNG: never, even with --overwrite)."""
    from diffusekit.io.runs import overlap

    out, animate, maps = Path(args.out), args.animate, getattr(args, "attention_maps", None)
    if maps and (Path(maps).is_dir() or Path(maps).suffix.lower() not in IMAGE_SUFFIXES):
        raise UserError(f"--attention-maps '{maps}' is {'a folder' if Path(maps).is_dir() else 'not an image file name'}; give a .png file name")
    if out.suffix.lower() in IMAGE_SUFFIXES and out.is_dir():
        raise UserError(f"--out '{out}' is a folder; give a new file name for a grid, or a folder name without an image suffix for one PNG per image")
    if out.suffix.lower() not in IMAGE_SUFFIXES and out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is an existing file, not a folder; give a .png name for a grid, or a folder for one PNG per image")
    if animate and Path(animate).is_dir():
        raise UserError(f"--animate '{animate}' is a folder; give a .gif file name")
    written = output_files(out, args.index, args.n) + [Path(extra) for extra in (animate, maps) if extra]
    inputs = {"the init image": getattr(args, "init", None), "the mask": getattr(args, "mask", None), "--from": args.source,
              **{f"the control image {i}": path for i, (path, _) in enumerate(getattr(args, "control", None) or [])}}
    for what, path in inputs.items():
        clash = next((w for w in written if path is not None and overlap(w, Path(path))), None)
        if clash is not None:
            raise UserError(f"'{clash}' would be written over {what} '{path}', which this command reads; give another --out or --animate")
    existing = [w for w in written if w.exists()]
    if existing and not args.overwrite:
        names = ", ".join(str(w) for w in existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise UserError(f"{names} already exist{'s' if len(existing) == 1 else ''}; choose another --out (or --animate, --attention-maps), "
                        "or pass --overwrite to replace")


def output_files(out: Path, start: int, n: int) -> list[Path]:
    """The image files an --out means: the grid file, or the folder's sample_INDEX.png as images.save_images names them."""
    from diffusekit.images import image_paths

    return [out] if out.suffix.lower() in IMAGE_SUFFIXES else image_paths(out, start, n)


def _write_images(images, out: Path, noun: str, texts: list[str], start: int = 0) -> None:
    """A grid for an image file name (carrying the first image's parameters), else one PNG per image into the folder `out`."""
    from diffusekit.images import save_grid, save_images

    try:
        if out.suffix.lower() in IMAGE_SUFFIXES:
            save_grid(images, out, parameters=texts[0])
            print(f"wrote a grid of {len(images)} {noun} to {out}")
        else:
            save_images(images, out, start=start, parameters=texts)
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
    add_from(p)
    p.set_defaults(func=_sample)

    p = sub.add_parser("generate", help="text to image: images from a prompt")
    p.add_argument("prompt", nargs="*", help='the prompt, one argument: quote a prompt of several words ("a red apple"); '
                   'several prompts take turns over the --n images')
    p.add_argument("--model", help="a text-to-image run, checkpoint or diffusers folder (default: the shipped emoji demo model)")
    add_sampling_args(p, n=8, out="generated.png")
    add_from(p)
    add_lora_option(p)
    add_control_options(p)
    p.add_argument("--attention-maps", metavar="FILE.png", help="also draw where each word of the prompt lands in the images: "
                   "its cross-attention over layers, heads and steps (DAAM)")
    p.add_argument("--attention-words", metavar="WORDS", help="with --attention-maps: only these tokens, comma-separated, "
                   "as words or indices (red,apple or 0,1)")
    p.set_defaults(func=_sample, label=None)

    p = sub.add_parser("edit", help="image to image (SDEdit) and inpainting: an image changed by a prompt, or only where a mask is white")
    p.add_argument("init", metavar="INIT", help="the image to start from (PNG, JPEG, WebP): centre-cropped and resized to the output size")
    p.add_argument("prompt", nargs="*", help="the prompt (text-to-image models), one argument: quote a prompt of several words")
    p.add_argument("--model", help="a run, checkpoint or diffusers folder (default: the shipped emoji demo model)")
    p.add_argument("--strength", type=float, help="how much to change, in (0, 1]: 1 forgets the init image, near 0 keeps it "
                   "(default 0.8, or 1 with --mask)")
    p.add_argument("--mask", metavar="MASK", help="inpaint: an image of INIT's size, white where to repaint, black where to keep")
    p.add_argument("--mask-blur", type=float, help="feather the mask's edge by this many pixels (a Gaussian blur)")
    p.add_argument("--jump-length", type=positive_int, help="RePaint resampling: steps between jumps back up (default 10)")
    p.add_argument("--jump-n-sample", type=positive_int, help="RePaint resampling: walk every --jump-length steps this many times (1: off)")
    p.add_argument("--label", type=int, action="append", help="class label(s) for a class-conditional model (repeatable)")
    add_sampling_args(p, n=1, out="edited.png")
    add_from(p)
    add_lora_option(p)
    add_control_options(p)
    p.set_defaults(func=_sample)


def add_from(p) -> None:
    p.add_argument("--from", dest="source", metavar="IMAGE.png", help="make an image again from the parameters its PNG carries "
                   "(prompt, seed, index, sampler, steps, ...); options given here override them")
    p.set_defaults(seed=None, n=None, index=None, precision=None)
