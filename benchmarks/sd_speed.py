"""Seconds per U-Net call with Stable Diffusion 1.5's shape, diffusekit against diffusers, on the same weights.

    python benchmarks/sd_speed.py --size 256 --repeats 5 --json benchmarks/results/sd_speed.json

Stable Diffusion 1.5's own unet/config.json (860M parameters, random weights) is built by
diffusers, mapped to diffusekit's U-Net by io/diffusers.py, and the state dict copied over.
Both are called on the same batch of 2 latents (what classifier-free guidance runs) with
77 text tokens, in the same process, alternating so that a busy machine slows both alike.
diffusekit runs as its Pipeline does on a CPU (channels-last memory); the contiguous layout
is timed too. The JSON holds every time, the medians, their ratio and the largest output
difference.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from diffusekit.config import ModelConfig
from diffusekit.devices import use_all_cores
from diffusekit.io.diffusers import unet_fields
from diffusekit.nn.unet import UNet

SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}


def sd15_unet() -> UNet:
    """diffusekit's U-Net with Stable Diffusion 1.5's shape (random weights), through io/diffusers.py's config map."""
    fields = unet_fields(SD15_UNET, "SD 1.5 unet/config.json")
    return UNet.from_config(ModelConfig(**{key.split(".", 1)[1]: value for key, value in fields.items()}), in_channels=4).eval()


def build_pair(seed: int = 0):
    """(diffusers UNet2DConditionModel, diffusekit UNet) with the same random weights."""
    import diffusers

    torch.manual_seed(seed)
    theirs = diffusers.UNet2DConditionModel.from_config(SD15_UNET).eval()
    ours = sd15_unet()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (latents are 8x smaller)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="benchmarks/results/sd_speed.json")
    parser.add_argument("--note", default="2-core CPU shared with other benchmarks; run under nice -n 19, so times are noisy")
    args = parser.parse_args()
    threads = use_all_cores()
    theirs, ours = build_pair()
    latent = args.size // 8
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, latent, latent, generator=generator)
    context = torch.randn(args.batch, 77, 768, generator=generator)
    t = torch.full((args.batch,), 500.0)
    # diffusekit is timed in both layouts, converted in place between calls (one copy of the weights)
    runs = {
        "diffusers": (theirs, torch.contiguous_format, lambda: theirs(x, t, encoder_hidden_states=context).sample),
        "diffusekit": (ours, torch.channels_last, lambda: ours(x, t, context=context)),  # as Pipeline runs it on a CPU
        "diffusekit_contiguous": (ours, torch.contiguous_format, lambda: ours(x, t, context=context)),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    outputs = {}
    with torch.inference_mode():
        for round_ in range(args.repeats + 1):  # round 0 warms up and keeps the outputs to compare
            for name, (net, layout, call) in runs.items():
                net.to(memory_format=layout)
                seconds, out = timed(call)
                if round_ == 0:
                    outputs[name] = out
                else:
                    times[name].append(seconds)
                print(f"{name:22s} round {round_}: {seconds:.2f} s", flush=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "what": "seconds per U-Net call, Stable Diffusion 1.5 shape, random weights",
        "image_size": args.size, "latents": list(x.shape), "text_tokens": 77,
        "parameters": sum(p.numel() for p in ours.parameters()),
        "device": "cpu", "threads": threads, "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "diffusers": __import__("diffusers").__version__, "note": args.note,
        "repeats": args.repeats, "seconds": times, "median_seconds": medians,
        "ratio_diffusekit_over_diffusers": medians["diffusekit"] / medians["diffusers"],
        "ratio_contiguous_over_diffusers": medians["diffusekit_contiguous"] / medians["diffusers"],
        "max_abs_diff": max(float((outputs[name] - outputs["diffusers"]).abs().max()) for name in ("diffusekit", "diffusekit_contiguous")),
        "output_abs_max": float(outputs["diffusers"].abs().max()),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_seconds", "ratio_diffusekit_over_diffusers", "ratio_contiguous_over_diffusers", "max_abs_diff")}, indent=2))


if __name__ == "__main__":
    main()
