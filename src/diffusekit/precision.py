"""What the machine can do natively, and which number format each job runs in.

    precision = "auto" | "fp32" | "bf16" | "fp16"
    inference_dtype("auto", device)   # the networks' weights while sampling
    training_dtype("auto", device)    # autocast's dtype in training (master weights stay float32), or None

`auto` picks bfloat16 where the hardware multiplies it natively: a CPU with AVX512-BF16 or
AMX-BF16 (Intel Cooper Lake, Sapphire Rapids and later; AMD Zen 4 and later) or an ARM CPU with
the BF16 extension, and any CUDA GPU that supports it (else float16 for inference there). Elsewhere
it stays float32: bfloat16 runs on every CPU, but without native support it is emulated and slower.
Detection reads the CPU flags (/proc/cpuinfo on Linux) and what PyTorch's kernels were built for
(torch.backends.cpu.get_cpu_capability()); `diffusekit info --system` prints both.

DIFFUSEKIT_AUTO_PRECISION=bf16 (or fp32) makes `auto` on a CPU pick that dtype whatever the flags say: the
test suite runs its precision-sensitive tests both ways on every CPU with it (bf16 is then emulated where
the CPU lacks it), and a user can compare both paths on one machine.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
from pathlib import Path

import torch

from diffusekit.devices import available_cores, physical_cores
from diffusekit.errors import UserError, warn

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTO_ENV = "DIFFUSEKIT_AUTO_PRECISION"
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags of native bfloat16 arithmetic (Linux names); ARM: "bf16"
SHOWN_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "bf16", "asimd", "sve")


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict:
    """The CPU model, its flags that matter here, PyTorch's kernel level and the core counts."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "cpu model") and model in ("", platform.processor(), platform.machine()):
                model = value.strip()
            elif key in ("flags", "features"):
                flags |= set(value.split())
    except OSError:
        pass
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "unknown"
    return {
        "model": model,
        "flags": sorted(f for f in SHOWN_FLAGS if f in flags),
        "torch_capability": capability,
        "native_bf16": any(f in flags for f in BF16_FLAGS) or (platform.machine() in ("aarch64", "arm64") and "bf16" in flags),
        "logical_cores": available_cores(),
        "physical_cores": physical_cores(),
    }


def check_precision(precision: str, what: str = "--precision") -> str:
    if precision not in PRECISIONS:
        raise UserError(f"{what} {precision!r} is not one of: {', '.join(PRECISIONS)}")
    return precision


def forced_cpu_precision() -> str | None:
    """DIFFUSEKIT_AUTO_PRECISION (bf16 or fp32): what `auto` picks on a CPU instead of what the flags say; None if unset."""
    value = os.environ.get(AUTO_ENV, "").strip()
    if value and value not in ("bf16", "fp32"):
        raise UserError(f"{AUTO_ENV}={value!r} is not bf16 or fp32; unset it to let --precision auto follow the CPU's flags")
    return value or None


def auto_cpu_bf16() -> bool:
    """Whether `auto` runs bf16 on this CPU: where it is native, unless DIFFUSEKIT_AUTO_PRECISION says otherwise."""
    forced = forced_cpu_precision()
    return forced == "bf16" if forced else cpu_info()["native_bf16"]


def auto_reason(device: torch.device) -> str:
    """Why `auto` picks what it picks on `device`, in words."""
    if device.type == "cuda":
        return "CUDA: bf16 where the GPU supports it, else fp16"
    if forced_cpu_precision():
        return f"{AUTO_ENV}={forced_cpu_precision()} is set (the CPU's own flags are not consulted)"
    info = cpu_info()
    if info["native_bf16"]:
        return f"this CPU multiplies bf16 natively ({', '.join(f for f in info['flags'] if 'bf16' in f)})"
    return "this CPU has no native bf16 (no AVX512-BF16 / AMX-BF16), so bf16 would be emulated and slower"


def inference_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype the networks hold while sampling (the samplers' sigma arithmetic stays float32 / float64)."""
    precision = check_precision(precision)
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if auto_cpu_bf16() else torch.float32
    if device.type == "cpu":
        refuse_cpu_fp16(precision)
        warn_if_emulated(precision)
    return DTYPES[precision]


def training_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """autocast's dtype for training (None: plain float32); the weights and optimizer state stay float32."""
    precision = check_precision(precision, "train.precision")
    if precision == "fp16":
        raise UserError("train.precision = fp16 is not supported (float16 training needs loss scaling); use bf16 or fp32")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return torch.bfloat16 if auto_cpu_bf16() else None
    if device.type == "cpu":
        warn_if_emulated(precision)
    return DTYPES[precision] if precision == "bf16" else None


def refuse_cpu_fp16(precision: str) -> None:
    if precision == "fp16":
        raise UserError("fp16 is not supported on a CPU here (PyTorch's CPU kernels are slow or missing for float16); "
                        "use --precision bf16 (or fp32, or auto)")


@functools.lru_cache(maxsize=None)
def warn_if_emulated(precision: str) -> None:
    """Once per process: bf16 asked for on a CPU without native bf16."""
    if precision == "bf16" and not cpu_info()["native_bf16"]:
        warn("bf16 on this CPU is emulated (no AVX512-BF16 / AMX-BF16): it works, but is slower than fp32; --precision auto picks fp32 here")


def system_summary() -> dict:
    """What `diffusekit info --system` shows: the hardware, what `auto` picks on it, and whether torch.compile can build."""
    cpu = torch.device("cpu")
    summary = {
        "cpu": cpu_info(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "auto": {"cpu": {"inference": dtype_name(inference_dtype("auto", cpu)), "training": dtype_name(training_dtype("auto", cpu)),
                         "why": auto_reason(cpu)}},
        "compiler": shutil.which("g++") or shutil.which("c++") or shutil.which("clang++"),
        "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [],
    }
    if summary["cuda"]:
        gpu = torch.device("cuda")
        summary["auto"]["cuda"] = {"inference": dtype_name(inference_dtype("auto", gpu)), "training": dtype_name(training_dtype("auto", gpu))}
    return summary


def dtype_name(dtype: torch.dtype | None) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[dtype]


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """A Pipeline's dtype argument: a torch.dtype or one of PRECISIONS."""
    if isinstance(dtype, torch.dtype):
        name = dtype_name(dtype) if dtype in DTYPES.values() else None
        if name is None:
            raise UserError(f"dtype {dtype} is not supported; use torch.float32, torch.bfloat16 or torch.float16")
        return inference_dtype(name, device)
    return inference_dtype(str(dtype), device)
