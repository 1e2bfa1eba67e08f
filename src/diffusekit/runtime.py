"""Process-level settings: device choice, CPU threads, durations, per-sample generators."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

from diffusekit.errors import DiffusekitWarning, UserError

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(h|m|s)")


def warn(message: str) -> None:
    """A DiffusekitWarning (errors.py): the CLI prints it as one 'warning: ...' line, a program may filter it."""
    warnings.warn(message, DiffusekitWarning, stacklevel=2)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def physical_cores() -> int:
    """Cores this process may use, counting hyper-threads of one core once (GEMMs gain nothing from siblings)."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def derive_seed(seed: int, index: int) -> int:
    """A seed for stream `index` (an epoch, a sample, a rank) of the run seed `seed`, within the 64 bits a
    torch.Generator takes (seeds are below 2^63, so small seeds give the same streams as ever)."""
    return (seed * 1_000_003 + index) % 2**64


def cache_dir() -> Path:
    """Where derived data is cached (renderings, reference features, latents): $DIFFUSEKIT_CACHE or ~/.cache/diffusekit."""
    return Path(os.environ.get("DIFFUSEKIT_CACHE", Path.home() / ".cache" / "diffusekit"))


def parse_duration(text: str) -> float:
    """'10m' -> 600.0, '1h30m' -> 5400.0, '90s' or '90' -> 90.0 seconds."""
    cleaned = text.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", cleaned):
        return float(cleaned)
    parts = _DURATION.findall(cleaned)
    if not cleaned or "".join(n + u for n, u in parts) != cleaned:
        raise UserError(f"cannot read the duration '{text}'; write it like 90s, 10m, 1h or 1h30m")
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0}
    return sum(float(n) * scale[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def use_all_cores(threads: int = 0) -> int:
    """One thread per physical core by default (torch may start with fewer, or with one per hyper-thread,
    which only slows its matrix kernels down)."""
    count = threads if threads > 0 else physical_cores()
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def pick_device(name: str = "auto", option: str = "--set train.device=") -> torch.device:
    """The torch device `name` (auto: a GPU if there is one); `option` is how the user chose it, for the messages."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' was asked for but no CUDA GPU is visible; use {option}cpu (or {option}auto)")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device '{name}' is not supported (the schedule math runs in float64); use cpu or cuda")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device '{name}' does not exist: {torch.cuda.device_count()} GPU(s) are visible (cuda:0 ..)")
    return device


def sample_generators(seed: int, count: int, start: int = 0) -> list[torch.Generator]:
    """One CPU generator per sample, so that image i of seed s never depends on the batch size."""
    return [torch.Generator().manual_seed(derive_seed(seed, start + i)) for i in range(count)]


def randn(shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise from None (global RNG), one generator, or a list of per-sample generators.

    Per-sample noise is drawn on the CPU and moved, so it is identical on every device.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        noise = torch.stack([torch.randn(shape[1:], generator=g, dtype=dtype) for g in generator])
        return noise.to(device) if device is not None else noise
    if generator is not None and device is not None and generator.device != torch.device(device):
        return torch.randn(shape, generator=generator, dtype=dtype, device=generator.device).to(device)
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)


def prepare_module(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move a network to its device; on a CPU use channels-last memory (about 10% faster convolutions there)."""
    module = module.to(device)
    return module.to(memory_format=torch.channels_last) if device.type == "cpu" else module
