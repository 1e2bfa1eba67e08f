"""The memory layout a network runs fastest in on this CPU, measured once and remembered.

    layout = choose_layout(net, (x, t, cond))                          # sampling: one network call
    layout = choose_layout(net, (x, t, cond), training=True, autocast_dtype=torch.bfloat16)  # forward + backward

A CPU's convolutions run on NCHW ("contiguous") or NHWC ("channels_last") tensors, and which is faster
depends on the CPU, the dtype and the network: in bf16 on an AMD EPYC Zen 4 / Zen 5 the mnist U-Net runs
13-40% faster contiguous while the SD-1.5-shaped U-Net runs a few % faster channels-last; in fp32 (Zen 2,
Zen 5) channels-last wins or ties everywhere (docs/benchmarks.md). A third candidate keeps the
convolutions channels-last but lets each GroupNorm work on an NCHW copy (nn/blocks.GroupNorm: the
channels-last GroupNorm kernel is the slow part in bf16). No rule read off a few CPUs covers the next
one, so the first use of a network times it in each layout, alternating, and keeps the fastest (the
network is converted in place). The answer is cached per CPU model and flags, torch build,
threads, dtype, network shape and input shape in `cache_dir()/layouts.json` (never in a run folder);
a damaged or stale cache is ignored with one warning and rebuilt, and a cache that cannot be written
costs only a new measurement next time. DIFFUSEKIT_LAYOUT=channels_last or contiguous skips the
measurement (or any other name of LAYOUTS); on a GPU networks stay contiguous. `diffusekit info --system` lists
the cached choices.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import torch

from diffusekit.denoiser import cast_floats, network_dtype
from diffusekit.errors import UserError, warn
from diffusekit.files import cache_dir, write_json_atomic
from diffusekit.precision import cpu_info, dtype_name

# name: (the memory format of weights and activations, whether GroupNorms normalise an NCHW copy: nn/blocks.GroupNorm)
LAYOUTS = {
    "channels_last": (torch.channels_last, False),
    "contiguous": (torch.contiguous_format, False),
    "channels_last_nchw_norms": (torch.channels_last, True),
}
LAYOUT_ENV = "DIFFUSEKIT_LAYOUT"
CACHE_VERSION = 1
ROUNDS = 3  # timed calls per layout, after one warm-up call each; the fastest call of each counts


def cache_path():
    return cache_dir() / "layouts.json"


def forced_layout() -> str | None:
    """DIFFUSEKIT_LAYOUT, if set: the layout every network takes, without measuring."""
    value = os.environ.get(LAYOUT_ENV, "").strip()
    if value and value not in LAYOUTS:
        raise UserError(f"{LAYOUT_ENV}={value!r} is not one of {', '.join(LAYOUTS)}; unset it to let diffusekit measure the faster one")
    return value or None


def apply_layout(net: torch.nn.Module, layout: str) -> torch.nn.Module:
    memory_format, nchw_norms = LAYOUTS[layout]
    for module in net.modules():
        if hasattr(module, "nchw_inside"):
            module.nchw_inside = nchw_norms
    return net.to(memory_format=memory_format)


def layout_key(net: torch.nn.Module, inputs: tuple, training: bool, autocast_dtype: torch.dtype | None) -> str:
    """What the measurement depends on: the machine, the torch build, the network's shape and the inputs' shapes."""
    cpu = cpu_info()
    shapes = hashlib.sha256(";".join(f"{n}:{tuple(p.shape)}:{p.dtype}" for n, p in net.state_dict().items()).encode()).hexdigest()[:16]
    x, t, cond = inputs
    inputs_text = ",".join([f"x{tuple(x.shape)}", *(f"{k}{tuple(v.shape)}" for k, v in sorted(cond.items()))])
    mode = f"training in {dtype_name(autocast_dtype)}" if training else f"sampling in {dtype_name(network_dtype(net))}"
    return "|".join([cpu["model"], " ".join(cpu["flags"]), torch.__version__, f"{torch.get_num_threads()} threads",
                     type(net).__name__, shapes, inputs_text, mode])


def read_cache() -> dict:
    """{key: {"layout": ..., "seconds": {...}}}; a damaged or stale file is ignored with one warning (and rebuilt)."""
    path = cache_path()
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):  # nothing measured yet (or no folder can be made there: remember() says so)
        return {}
    except (OSError, ValueError) as err:
        warn(f"the layout cache {path} is unreadable ({type(err).__name__}); ignoring it: each network's layout is measured again")
        return {}
    entries = data.get("layouts") if isinstance(data, dict) and data.get("version") == CACHE_VERSION else None
    if not isinstance(entries, dict) or not all(isinstance(v, dict) and v.get("layout") in LAYOUTS for v in entries.values()):
        warn(f"the layout cache {path} is stale or damaged; ignoring it: each network's layout is measured again")
        return {}
    return entries


def remember(entries: dict) -> None:
    """Write the cache's entries; a folder that cannot be written only means measuring again next time."""
    try:
        write_json_atomic(cache_path(), {"version": CACHE_VERSION, "layouts": entries})
    except OSError as err:
        warn(f"cannot save the layout choice in {cache_path()} ({err.strerror or err}); it is measured again next time")


def time_layouts(net: torch.nn.Module, call) -> dict[str, float]:
    """Seconds of call(memory_format) in each layout: one warm-up each, then ROUNDS alternating rounds; the fastest counts."""
    seconds = {name: [] for name in LAYOUTS}
    for round_ in range(ROUNDS + 1):
        for name, (fmt, _) in LAYOUTS.items():
            apply_layout(net, name)
            start = time.perf_counter()
            call(fmt)
            if round_:
                seconds[name].append(time.perf_counter() - start)
    return {name: min(times) for name, times in seconds.items()}


def probe_call(net: torch.nn.Module, inputs: tuple, training: bool, autocast_dtype: torch.dtype | None):
    """One representative call of `net` on `inputs` in a given layout: sampling's forward, or training's forward
    and backward (under autocast). The global RNG and the gradients are left as they were."""
    x, t, cond = inputs
    dtype = network_dtype(net) if not training else x.dtype  # training: float32 weights, autocast does the rest
    cond = cast_floats(cond, dtype)

    def call(fmt):
        if not training:
            with torch.no_grad():
                net(x.to(dtype).contiguous(memory_format=fmt), t, **cond)
            return
        xf = x.contiguous(memory_format=fmt).requires_grad_(True)  # a backward even through a frozen network (LoRA training)
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            out = net(xf, t, **cond)
        out.float().square().mean().backward()

    return call


def choose_layout(net: torch.nn.Module, inputs: tuple, training: bool = False, autocast_dtype: torch.dtype | None = None) -> str:
    """Put `net` (on a CPU) in the layout it runs fastest in for `inputs` = (x, t, cond), measured once per machine and
    network shape (see the module's docstring); returns the layout's name."""
    if inputs[0].device.type != "cpu" or not any(p.ndim == 4 for p in net.parameters()):
        return "contiguous"  # a GPU's choice is its own; a network without convolutions has no layout to choose
    layout = forced_layout()
    key = layout_key(net, inputs, training, autocast_dtype)
    if layout is None:
        entries = read_cache()
        entry = entries.get(key)
        if entry is None:
            grads = [p.grad for p in net.parameters()]
            with torch.random.fork_rng():
                entry = {"layout": "", "seconds": time_layouts(net, probe_call(net, inputs, training, autocast_dtype))}
            for p, grad in zip(net.parameters(), grads):
                p.grad = grad
            entry["layout"] = min(entry["seconds"], key=entry["seconds"].get)
            remember(entries | {key: entry})
        layout = entry["layout"]
    apply_layout(net, layout)
    return layout


def cached_choices() -> list[dict]:
    """The cached measurements of this machine's CPU, for `diffusekit info --system`."""
    model = cpu_info()["model"]
    out = []
    for key, entry in read_cache().items():
        parts = key.split("|")
        if parts[0] == model and len(parts) == 8:
            out.append({"network": parts[4], "inputs": parts[6], "mode": parts[7], "threads": parts[3], "layout": entry["layout"],
                        "seconds": entry.get("seconds", {})})
    return out
