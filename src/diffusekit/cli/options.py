"""Argument types and the options several commands share."""

from __future__ import annotations

import argparse

from diffusekit.precision import PRECISIONS
from diffusekit.samplers import SAMPLERS
from diffusekit.schedule import SPACINGS


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
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


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of the commands that train into a run folder (train, train-vae, finetune)."""
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. --set train.lr=2e-4 (repeatable)")
    p.add_argument("--budget", help="stop after this much wall-clock time, e.g. 10m, 90s, 1h30m")
    p.add_argument("--steps", type=positive_int, help="stop after this many optimizer steps (train.max_steps)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


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
    p.add_argument("--index", type=non_negative_int, default=0, help="the index of the first image in the seed's sequence: "
                   "--seed 5 --index 3 --n 1 makes image 3 of seed 5 alone (each image of a seed is the same whatever --n)")
    p.add_argument("--size", type=positive_int, help="image size in pixels (default: the size the model was trained at)")
    p.add_argument("--out", default=out, help="a .png grid, or a folder for one PNG per image")
    p.add_argument("--overwrite", action="store_true", help="replace output files that exist (never an input of this command)")
    p.add_argument("--animate", metavar="GIF", help="also write the reverse process as an animated GIF")
    p.add_argument("--batch-size", type=positive_int, help="images sampled at once (default: the model's sample.batch_size, 64); the images do not depend on it")
    p.add_argument("--weights", choices=("ema", "model"), default="ema")
    p.add_argument("--config", metavar="FOLDER", help="a single-file model (.safetensors / .ckpt): a diffusers folder whose configs "
                   "(scheduler, tokenizer, head counts) replace the family's defaults")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a single-file model: override its config, e.g. --set diffusion.prediction=eps")
    add_speed_args(p)


def add_speed_args(p: argparse.ArgumentParser) -> None:
    """--device, --precision and --compile: where and how fast the network runs (sample, generate, eval)."""
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="the network's number format: auto (bf16 where the CPU or GPU has it natively, else fp32), fp32, bf16, fp16 (GPU only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (the first call compiles, for minutes on a big model)")


def describe_speed(pipe, precision: str) -> str:
    """One line: what the network ran in (and why, for --precision auto), and the compile time if it was compiled."""
    from diffusekit.precision import auto_reason

    line = f"ran the network in {pipe.precision} on {pipe.device}" + (f" (auto: {auto_reason(pipe.device)})" if precision == "auto" else "")
    seconds = getattr(pipe.sampling_net, "compile_seconds", None)
    if seconds is not None:
        line += " eagerly: compilation failed" if pipe.sampling_net.failed else f", compiled in {seconds:.1f} s"
    return line


# ----------------------------------------------------------------------------- LoRAs (sample, generate, and any command that samples)


def lora_spec(text: str):
    """--lora FILE[:SCALE] -> (path, scale); a scale that is not a number is a one-line usage error."""
    from diffusekit.errors import UserError
    from diffusekit.io.lora import parse_lora_spec

    try:
        return parse_lora_spec(text)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_lora_option(p: argparse.ArgumentParser) -> None:
    """--lora FILE[:SCALE], repeatable; apply_loras(pipe, args.lora) loads them."""
    p.add_argument("--lora", action="append", type=lora_spec, metavar="FILE[:SCALE]",
                   help="a LoRA file (diffusers / peft or kohya / A1111 layout; a `diffusekit finetune` run folder means its "
                        "lora.safetensors) at a scale (default 1), e.g. style.safetensors:0.8; repeatable")


def apply_loras(pipe, specs) -> None:
    """Load each (path, scale) of --lora into the pipeline, then fuse them into its weights in memory (sampling
    runs as fast as without; the model's files are never changed)."""
    for path, scale in specs or []:
        name = pipe.load_lora(path, scale=scale)
        print(f"LoRA {name} from {path} at scale {scale:g}")
    if specs:
        pipe.fuse_lora(keep_original=False)  # never unfused here: no copy of the weights needed


# ----------------------------------------------------------------------------- ControlNets (generate, edit)


def control_spec(text: str):
    """--control IMAGE[:SCALE] -> (path, scale); a scale that is not a number is a one-line usage error."""
    from diffusekit.errors import UserError
    from diffusekit.io.lora import parse_lora_spec

    try:
        return parse_lora_spec(text, what="a control image", example="edges.png:0.8")
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_control_options(p: argparse.ArgumentParser) -> None:
    """--controlnet RUN_OR_FOLDER and --control IMAGE[:SCALE], each repeatable and paired in order; control_arguments reads them."""
    p.add_argument("--controlnet", action="append", metavar="RUN_OR_FOLDER",
                   help="a ControlNet: a diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors), a "
                        "`train-controlnet` run, or a ControlNet 1.x file (.safetensors, .pth); repeatable")
    p.add_argument("--control", action="append", type=control_spec, metavar="IMAGE[:SCALE]",
                   help="the control image of each --controlnet, in order (edges, a scribble: white lines on black), at a scale "
                        "(default 1), e.g. edges.png:0.8")
    p.add_argument("--control-start", type=float, default=0.0, help="the fraction of the steps after which the ControlNets act (default 0)")
    p.add_argument("--control-end", type=float, default=1.0, help="the fraction of the steps after which they stop (default 1)")


def control_arguments(pipe, args) -> dict:
    """Load each --controlnet into the pipeline; Pipeline.sample's control arguments from --control (the images opened, not resized)."""
    from diffusekit.errors import UserError
    from diffusekit.images import open_image

    controlnets, controls = getattr(args, "controlnet", None) or [], getattr(args, "control", None) or []
    for folder in controlnets:
        print(f"ControlNet {pipe.load_controlnet(folder)} from {folder}")
    if controls and not pipe.controlnets:
        raise UserError(f"--control {controls[0][0]} needs a ControlNet: add --controlnet RUN_OR_FOLDER (a diffusers ControlNet folder, a run or a file)")
    if len(controls) != len(pipe.controlnets) and (controls or controlnets):
        raise UserError(f"{len(pipe.controlnets)} ControlNet(s) ({', '.join(pipe.controlnets)}) but {len(controls)} --control: "
                        "give one --control IMAGE[:SCALE] per ControlNet, in order")
    if not controls:
        return {}
    return {"control_image": [open_image(path, f"control image {path}") for path, _ in controls],
            "controlnet_conditioning_scale": [scale for _, scale in controls],
            "control_guidance_start": args.control_start, "control_guidance_end": args.control_end}
