"""diffusekit against diffusers on the same weights, in one process: the five things users time first.

    python benchmarks/speed.py --json benchmarks/results/speed-$(hostname).json          # all parts
    python benchmarks/speed.py --parts c,d --repeats 3 --compile                          # some, with torch.compile variants

(a) the mnist preset's training step (images/s), (b) mnist sampling at 20 network calls (images/s),
(c) one Stable Diffusion 1.5-shaped U-Net call at 256 px, batch 2 (classifier-free guidance),
(d) the SD VAE decode at 256 and 512 px, (e) the shipped emoji model, 8 images at 20 steps, from
process start (`diffusekit generate` as `make demo` runs it).

Every part times diffusers as users run it (float32, contiguous, eager), diffusers in diffusekit's
precision by hand (when that is not float32), and diffusekit's variants, each one change alone:
`default` (what --precision auto gives on this CPU, in the memory layout layout.py measures for the
network: the JSON's `layout_chosen`), `channels_last`, `contiguous` and `channels_last_nchw_norms`
(each layout of layout.LAYOUTS pinned),
`compiled` (torch.compile; its compile time is reported apart), `int8` (dynamic int8 Linear layers,
part c). The layout cache starts empty (a temporary DIFFUSEKIT_CACHE), so `default` is the choice a
first use on this machine makes. Variants run in alternating rounds, so that a change in the machine's
load slows all alike; the JSON holds every time, the medians, each ratio against diffusers' float32,
the largest output difference against it, the peak memory of (c) and (d) (each variant in its own
process), the CPU model and its flags. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from sd_memory import SD15_VAE, memory_kib, reset_peak
from sd_speed import build_pair
from train_mnist import diffusers_twin

from diffusekit.compiled import compile_network
from diffusekit.config import load_preset
from diffusekit.devices import prepare_module, use_all_cores
from diffusekit.layout import LAYOUTS, apply_layout, choose_layout
from diffusekit.losses import diffusion_loss
from diffusekit.models import build_net, example_inputs
from diffusekit.nn.vae import AutoencoderKL
from diffusekit.precision import cpu_info, dtype_name, inference_dtype, training_dtype
from diffusekit.schedule import NoiseSchedule

CPU = torch.device("cpu")
CL = torch.channels_last


def timed_rounds(calls: dict, repeats: int) -> tuple[dict, dict]:
    """Seconds per call of each variant over alternating rounds (round 0 warms up and keeps the outputs).
    A variant is a call, or (setup, call) where the untimed setup prepares a network shared with another variant."""
    times, outputs = {name: [] for name in calls}, {}
    for round_ in range(repeats + 1):
        for name, variant in calls.items():
            setup, call = variant if isinstance(variant, tuple) else (None, variant)
            if setup is not None:
                setup()
            start = time.perf_counter()
            out = call()
            seconds = time.perf_counter() - start
            if round_ == 0:
                outputs[name] = out.float() if torch.is_tensor(out) else out
            else:
                times[name].append(seconds)
            print(f"  {name:24s} round {round_}: {seconds:.3f} s", flush=True)
    return times, outputs


def summarise(times: dict, outputs: dict, reference: str = "diffusers_fp32", per_call: int = 1) -> dict:
    medians = {name: statistics.median(values) for name, values in times.items()}
    ref = outputs.get(reference)
    return {
        "seconds": times, "median_seconds": medians,
        "per_second": {name: per_call / s for name, s in medians.items()},
        "speed_vs_diffusers_fp32": {name: medians[reference] / s for name, s in medians.items()},
        "max_abs_diff_vs_diffusers_fp32": {name: float((out - ref).abs().max()) for name, out in outputs.items()
                                           if torch.is_tensor(out) and ref is not None and out.shape == ref.shape},
    }


def low_precision() -> torch.dtype:
    return inference_dtype("auto", CPU)


def compiled_call(net, make_call, timings: dict, name: str):
    """A call through torch.compile; the first (compiling) call is timed into `timings` and not counted."""
    compiled = compile_network(net)
    call = make_call(compiled)
    start = time.perf_counter()
    call()
    timings[name] = time.perf_counter() - start
    return call


# ----------------------------------------------------------------------------- (a) and (b): mnist


def mnist_pair():
    config = load_preset("mnist")
    torch.manual_seed(0)
    ours = build_net(config)
    theirs = diffusers_twin(config)
    theirs.load_state_dict(ours.state_dict())
    return config, ours, theirs


def part_a(args) -> dict:
    """Training steps of the mnist preset on random data: the trainer's loss, AdamW, batch 64."""
    config, ours, theirs = mnist_pair()
    schedule, batch = NoiseSchedule.from_config(config.diffusion), config.train.batch_size
    x0 = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    autocast = training_dtype("auto", CPU)

    def stepper(net, forward, dtype=None, steps=args.train_steps):
        net = net.train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        generator = torch.Generator().manual_seed(0)

        def run():
            for _ in range(steps):
                with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    loss = diffusion_loss(forward, schedule, x0, prediction="v", weighting="min_snr", generator=generator)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return loss.detach()
        return run

    copies = {name: build_net(config) for name in ("default", *LAYOUTS, "compiled")}
    for net in copies.values():
        net.load_state_dict(ours.state_dict())
    calls = {"diffusers_fp32": stepper(theirs, lambda x, t: theirs(x, t).sample)}
    if autocast is not None:
        twin = diffusers_twin(config)
        twin.load_state_dict(ours.state_dict())
        calls[f"diffusers_{dtype_name(autocast)}"] = stepper(twin, lambda x, t: twin(x, t).sample, autocast)
    chosen = choose_layout(copies["default"].train(), example_inputs(config, batch, CPU), training=True, autocast_dtype=autocast)  # as train does
    calls["diffusekit_default"] = stepper(copies["default"], copies["default"], autocast)
    for name in LAYOUTS:
        calls[f"diffusekit_{name}"] = stepper(apply_layout(copies[name], name), copies[name], autocast)
    compile_seconds = {}
    if args.compile:
        net = prepare_module(copies["compiled"], CPU)
        compiled = compile_network(net)
        warm = stepper(net, compiled, autocast, steps=2)
        start = time.perf_counter()
        warm()
        compile_seconds["diffusekit_compiled"] = time.perf_counter() - start
        calls["diffusekit_compiled"] = stepper(net, compiled, autocast)
    times, _ = timed_rounds(calls, args.repeats)
    result = summarise(times, {}, per_call=args.train_steps * batch)
    return {"what": f"{args.train_steps} training steps of the mnist preset, batch {batch}; per_second = images/s",
            "autocast": dtype_name(autocast), "layout_chosen": chosen, "compile_seconds": compile_seconds, **result}


def part_b(args) -> dict:
    """64 mnist images at 20 network calls: DPM-Solver++ 2M on both sides (diffusers' scheduler, diffusekit's Pipeline)."""
    from diffusers import DPMSolverMultistepScheduler

    from diffusekit.pipeline import Pipeline

    config, ours, theirs = mnist_pair()
    n, steps = 64, 20
    noise = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    d = config.diffusion
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=d.timesteps, beta_start=d.beta_start, beta_end=d.beta_end,
                                            beta_schedule="linear", prediction_type="v_prediction", timestep_spacing="trailing")

    def diffusers_loop(net, dtype=torch.float32):
        def run():
            scheduler.set_timesteps(steps)
            x = noise * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                with torch.inference_mode():
                    out = net(x.to(dtype), t).sample.float()
                x = scheduler.step(out, t, x).prev_sample
            return x.clamp(-1, 1)
        return run

    def ours_call(pipe):
        return lambda: pipe.sample(n, steps=steps, sampler="dpmpp_2m", spacing="trailing", noise=noise, batch_size=n)

    low = low_precision()
    calls = {"diffusers_fp32": diffusers_loop(theirs.eval())}
    if low != torch.float32:
        twin = diffusers_twin(config).eval().to(low)
        twin.load_state_dict(ours.state_dict())
        calls[f"diffusers_{dtype_name(low)}"] = diffusers_loop(twin, low)
    nets = {name: build_net(config).requires_grad_(False) for name in ("default", *LAYOUTS, "compiled")}
    for net in nets.values():
        net.load_state_dict(ours.state_dict())
    default = Pipeline(config, prepare_module(nets["default"], CPU), dtype=low)  # its first sample() measures the layout
    calls["diffusekit_default"] = ours_call(default)
    for name in LAYOUTS:
        pipe = Pipeline(config, nets[name], dtype=low)
        pipe.layouts[(n, None, "cpu")] = name  # pinned: use_fastest_layout takes it as already chosen
        calls[f"diffusekit_{name}"] = ours_call(pipe)
    compile_seconds = {}
    if args.compile:
        pipe = Pipeline(config, prepare_module(nets["compiled"], CPU), dtype=low, compile=True)
        call = ours_call(pipe)
        start = time.perf_counter()
        call()
        compile_seconds["diffusekit_compiled"] = time.perf_counter() - start
        calls["diffusekit_compiled"] = call
    times, outputs = timed_rounds(calls, args.repeats)
    return {"what": f"{n} mnist images at {steps} network calls (DPM-Solver++ 2M, trailing); per_second = images/s",
            "precision": dtype_name(low), "layout_chosen": default.layouts[(n, None, "cpu")], "compile_seconds": compile_seconds,
            **summarise(times, outputs, per_call=n)}


# ----------------------------------------------------------------------------- (c) and (d): Stable Diffusion shapes


def sd_inputs(size: int):
    generator = torch.Generator().manual_seed(1)
    latent = size // 8
    return torch.randn(2, 4, latent, latent, generator=generator), torch.randn(2, 77, 768, generator=generator), torch.full((2,), 500.0)


def part_c(args) -> dict:
    theirs, ours = build_pair()
    x, context, t = sd_inputs(256)
    low = low_precision()
    state = ours.state_dict()
    calls = {"diffusers_fp32": lambda: theirs(x, t, encoder_hidden_states=context).sample}
    if low != torch.float32:
        import copy
        twin = copy.deepcopy(theirs).to(low)
        calls[f"diffusers_{dtype_name(low)}"] = lambda: twin(x.to(low), t, encoder_hidden_states=context.to(low)).sample
    net = ours.to(low)  # one copy of the weights for every layout, converted (untimed) before each call
    xl, cl = x.to(low), context.to(low)
    with torch.inference_mode():
        chosen = choose_layout(net, (x, t, {"context": context}))  # as Pipeline.sample does on first use
    calls["diffusekit_default"] = (lambda: apply_layout(net, chosen), lambda: net(xl.contiguous(memory_format=LAYOUTS[chosen][0]), t, context=cl))
    for name, (fmt, _) in LAYOUTS.items():
        calls[f"diffusekit_{name}"] = (lambda name=name: apply_layout(net, name), lambda fmt=fmt: net(xl.contiguous(memory_format=fmt), t, context=cl))
    if args.int8:
        quantized = int8_linears(prepare_module(build_like(state, torch.float32), CPU))
        calls["diffusekit_int8"] = lambda: quantized(x.to(memory_format=CL), t, context=context)
    compile_seconds = {}
    if args.compile:
        net = prepare_module(build_like(state, low), CPU)
        calls["diffusekit_compiled"] = compiled_call(net, lambda c: (lambda: c(xl, t, context=cl)), compile_seconds, "diffusekit_compiled")
    with torch.inference_mode():
        times, outputs = timed_rounds(calls, args.repeats)
    return {"what": "one U-Net call, Stable Diffusion 1.5 shape (860M parameters, random weights), 256 px, batch 2, 77 tokens",
            "precision": dtype_name(low), "layout_chosen": chosen, "compile_seconds": compile_seconds, **summarise(times, outputs),
            "output_abs_max": float(outputs["diffusers_fp32"].abs().max())}


def build_like(state: dict, dtype: torch.dtype):
    from sd_speed import sd15_unet

    net = sd15_unet()
    net.load_state_dict(state)
    return net.to(dtype)


def int8_linears(net):
    """Dynamic int8 quantization of every Linear layer (attention projections, feed-forward) through torch.ao."""
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(net, {torch.nn.Linear}, dtype=torch.qint8)


def sd_vae_pair():
    import diffusers

    torch.manual_seed(0)
    theirs = diffusers.AutoencoderKL(block_out_channels=list(SD15_VAE["channels"]), layers_per_block=2, latent_channels=4, norm_num_groups=32,
                                     down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4).eval()
    ours = AutoencoderKL(**SD15_VAE).eval()
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def part_d(args) -> dict:
    theirs, ours = sd_vae_pair()
    results = {}
    for size in args.vae_sizes:
        latent = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(3))
        calls = {"diffusers_fp32": lambda: theirs.decode(latent).sample,
                 "diffusekit_default": (lambda: ours.to(memory_format=CL), lambda: ours.decode(latent.to(memory_format=CL), slice_size=1)),
                 "diffusekit_contiguous": (lambda: ours.to(memory_format=torch.contiguous_format), lambda: ours.decode(latent, slice_size=1))}
        with torch.inference_mode():
            times, outputs = timed_rounds(calls, args.repeats)
        results[f"{size}px"] = summarise(times, outputs)
    return {"what": "one SD VAE decode (random weights, float32: diffusekit decodes in float32 at every precision)", **results}


# ----------------------------------------------------------------------------- (e): the demo, from process start

DEMO_PROMPTS = ["red apple", "grinning face", "rocket", "sun", "snowman", "pizza", "red heart", "dog face"]


def part_e(args) -> dict:
    exe = Path(sys.executable).with_name("diffusekit")
    variants = {"diffusekit_fp32": ["--precision", "fp32"], "diffusekit_default": ["--precision", "auto"]}
    times = {name: [] for name in variants}
    for round_ in range(args.repeats):
        for name, extra in variants.items():
            out = Path(f"/tmp/speed_demo_{name}.png")
            start = time.perf_counter()
            subprocess.run([str(exe), "generate", *DEMO_PROMPTS, "--n", "8", "--steps", "20", "--seed", "0", "--out", str(out), "--overwrite", *extra],
                           check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
            print(f"  {name:24s} round {round_}: {times[name][-1]:.2f} s", flush=True)
    medians = {name: statistics.median(v) for name, v in times.items()}
    return {"what": "`diffusekit generate` of 8 emoji prompts at 20 steps, wall seconds from process start (no diffusers twin: "
                    "the emoji model's MiniLM text encoder with masked padding has no StableDiffusionPipeline equivalent)",
            "seconds": times, "median_seconds": medians, "speed_vs_fp32": {n: medians["diffusekit_fp32"] / s for n, s in medians.items()}}


# ----------------------------------------------------------------------------- peak memory, one process per variant


def memory_probe(what: str) -> dict:
    """Peak RSS above the weights of one call of `what` (c:diffusers, c:diffusekit, d256:diffusers, ...) in this process."""
    part, side = what.split(":")
    low = low_precision()
    if part == "c":
        theirs, ours = build_pair()
        x, context, t = sd_inputs(256)
        net = prepare_module(ours, CPU).to(low) if side == "diffusekit" else theirs
        call = (lambda: net(x.to(memory_format=CL).to(low), t, context=context.to(low))) if side == "diffusekit" else \
            (lambda: net(x, t, encoder_hidden_states=context).sample)
    else:
        size = int(part[1:])
        theirs, ours = sd_vae_pair()
        latent = torch.randn(1, 4, size // 8, size // 8)
        vae = prepare_module(ours, CPU) if side == "diffusekit" else theirs
        call = (lambda: vae.decode(latent.to(memory_format=CL), slice_size=1)) if side == "diffusekit" else (lambda: vae.decode(latent).sample)
    before = memory_kib("VmRSS")
    reset_peak()
    with torch.inference_mode():
        call()
    return {"peak_above_weights_mib": (memory_kib("VmHWM") - before) / 1024}


def peak_memory(args) -> dict:
    probes = [f"{p}:{side}" for p in ["c", *(f"d{s}" for s in args.vae_sizes)] for side in ("diffusers", "diffusekit")]
    result = {}
    for probe in probes:
        proc = subprocess.run([sys.executable, __file__, "--memory-probe", probe], capture_output=True, text=True, check=True)
        result[probe] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  memory {probe}: {result[probe]}", flush=True)
    return result


PARTS = {"a": part_a, "b": part_b, "c": part_c, "d": part_d, "e": part_e}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="a,b,c,d,e")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=10, help="training steps per timed call of part a")
    parser.add_argument("--vae-sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile variants (compiling takes minutes)")
    parser.add_argument("--int8", action="store_true", help="also time dynamic int8 Linear layers (part c)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes of (c) and (d)")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    parser.add_argument("--note", default="")
    parser.add_argument("--json", default="benchmarks/results/speed.json")
    args = parser.parse_args()
    threads = use_all_cores()
    os.environ["DIFFUSEKIT_CACHE"] = tempfile.mkdtemp(prefix="speed-cache-")  # the layout is measured afresh, as on a first use
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe)))
        return
    report = {"cpu": cpu_info(), "threads": threads, "torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
              "auto_inference": dtype_name(low_precision()), "auto_training": dtype_name(training_dtype("auto", CPU)), "note": args.note}
    for part in args.parts.split(","):
        print(f"part {part}", flush=True)
        report[part] = PARTS[part](args)
    if not args.no_memory and ({"c", "d"} & set(args.parts.split(","))):
        report["peak_memory"] = peak_memory(args)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({p: report[p].get("speed_vs_diffusers_fp32", report[p].get("speed_vs_fp32")) for p in args.parts.split(",")
                      if isinstance(report.get(p), dict)}, indent=2))


if __name__ == "__main__":
    main()
