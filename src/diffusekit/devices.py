"""The machine a process runs on: usable cores, torch's threads, the device a user names, a network placed on it."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from diffusekit.errors import UserError


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


def prepare_module(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move a network to its device; on a CPU use channels-last memory (about 10% faster convolutions there)."""
    module = module.to(device)
    return module.to(memory_format=torch.channels_last) if device.type == "cpu" else module
