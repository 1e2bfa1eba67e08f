"""Memory of Stable Diffusion 1.5 at 512 px on a CPU: the weights, and the peak on top of them.

    python benchmarks/sd_memory.py --size 512 --json benchmarks/results/sd_memory.json

Builds diffusekit's U-Net with Stable Diffusion 1.5's shape (the unet/config.json of
sd_speed.py) and its AutoencoderKL (vae/config.json: 128-256-512-512 channels) with random
weights, float32, prepared as the Pipeline prepares them on a CPU. Then one guided U-Net call
(a batch of 2 latents, 77 text tokens) and one decode of a latent to pixels, as `diffusekit
generate --size 512` runs them. Memory is read from /proc/self/status: VmRSS after building
(the weights) and VmHWM, the peak, which is reset (clear_refs) before each part.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from sd_speed import sd15_unet

from diffusekit.devices import prepare_module, use_all_cores
from diffusekit.nn.vae import AutoencoderKL

SD15_VAE = {"channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4, "norm_groups": 32, "scale_factor": 0.18215}
GIB = 2**30


def memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} is not in /proc/self/status (this benchmark needs Linux)")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)


def peak_of(fn) -> dict:
    """Seconds, peak RSS and its excess over the RSS before, of fn()."""
    before = memory_kib("VmRSS")
    reset_peak()
    start = time.perf_counter()
    with torch.inference_mode():
        fn()
    seconds = time.perf_counter() - start
    peak = memory_kib("VmHWM")
    return {"seconds": seconds, "peak_rss_gib": peak * 1024 / GIB, "above_weights_gib": (peak - before) * 1024 / GIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (latents are 8x smaller)")
    parser.add_argument("--json", default="benchmarks/results/sd_memory.json")
    args = parser.parse_args()

    use_all_cores()
    cpu = torch.device("cpu")
    start_rss = memory_kib("VmRSS")
    torch.manual_seed(0)
    unet = prepare_module(sd15_unet(), cpu)
    vae = prepare_module(AutoencoderKL(**SD15_VAE).eval(), cpu)
    weights = {name: sum(p.numel() * p.element_size() for p in m.parameters()) / GIB for name, m in (("unet", unet), ("vae", vae))}
    weights_rss = memory_kib("VmRSS")

    side = args.size // 8
    latents = torch.randn(2, 4, side, side).contiguous(memory_format=torch.channels_last)
    text = torch.randn(2, 77, 768)
    unet_call = peak_of(lambda: unet(latents, torch.tensor([500, 500]), context=text))
    decode = peak_of(lambda: vae.decode(latents[:1] / vae.scale_factor, slice_size=1))

    result = {
        "what": "peak memory of one guided U-Net call and one VAE decode, SD 1.5 shape, random float32 weights",
        "image_size": args.size, "latents": list(latents.shape), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "weights_gib": weights, "rss_before_gib": start_rss * 1024 / GIB, "rss_with_weights_gib": weights_rss * 1024 / GIB,
        "unet_call": unet_call, "vae_decode": decode,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
