"""The CUDA paths, checked on a GPU machine (the suite runs on CPUs only): training with bf16 autocast, the
bit-exact resume with a CUDA generator, every sampler in fp32 and bf16, CUDA against CPU, distillation and
LoRA fine-tuning. Each check records what it measured; the JSON holds the GPU, torch and the CPU.

    python benchmarks/cuda_paths.py --json benchmarks/results/cuda-paths-h200.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusekit.config import apply_overrides, load_preset
from diffusekit.diffusion_training import train
from diffusekit.distill import distill
from diffusekit.files import read_tensors
from diffusekit.finetune import finetune, finetune_config
from diffusekit.io.checkpoint import latest_checkpoint
from diffusekit.pipeline import Pipeline
from diffusekit.precision import cpu_info
from diffusekit.samplers import SAMPLERS


def mnist(run: Path, *sets: str):
    return train(apply_overrides(load_preset("mnist"), ["sample.n=8", "sample.steps=4", "eval.every=0", *sets]), run, progress=False)


def check_training(tmp: Path) -> dict:
    result = mnist(tmp / "mnist", "train.max_steps=300", "train.checkpoint_every=300")
    return {"steps": result.step, "images_per_s": result.images_per_second, "last_loss": result.last_loss,
            "finite": bool(np.isfinite(result.last_loss)), "precision": load_preset("mnist").train.precision}


def check_resume(tmp: Path) -> dict:
    """6 steps straight against 3 steps, then --resume to 6: every tensor of the checkpoints equal."""
    tiny = ["data.limit=512", "train.batch_size=32", "train.checkpoint_every=3"]
    mnist(tmp / "straight", *tiny, "train.max_steps=6")
    mnist(tmp / "resumed", *tiny, "train.max_steps=3")
    train(apply_overrides(load_preset("mnist"), ["sample.n=8", "sample.steps=4", "eval.every=0", *tiny, "train.max_steps=6"]),
          tmp / "resumed", resume=True, progress=False)
    a, b = latest_checkpoint(tmp / "straight"), latest_checkpoint(tmp / "resumed")
    same = {name: all(torch.equal(x, y) for x, y in zip(read_tensors(a / name).values(), read_tensors(b / name).values()))
            for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors")}
    return {"identical": same, "ok": all(same.values())}


def check_samplers(tmp: Path) -> dict:
    run = tmp / "mnist"
    out = {}
    for dtype in ("fp32", "bf16"):
        pipe = Pipeline.from_pretrained(run, device="cuda", dtype=dtype)
        for name in SAMPLERS:
            if name == "consistency":
                continue  # a consistency student's sampler (check_distill)
            x = pipe.sample(8, steps=10, sampler=name, seed=0)
            out[f"{name}-{dtype}"] = bool(torch.isfinite(x).all())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    gpu = Pipeline.from_pretrained(run, device="cuda").sample(8, steps=10, sampler="ddim", seed=0)
    cpu = Pipeline.from_pretrained(run, device="cpu").sample(8, steps=10, sampler="ddim", seed=0)
    return {"finite": out, "all_finite": all(out.values()), "ddim_fp32_cuda_vs_cpu_max_abs": (gpu.cpu() - cpu).abs().max().item()}


def check_distill(tmp: Path) -> dict:
    result = distill(tmp / "mnist", tmp / "cm", method="consistency", steps=2, train_steps=20, overrides=["eval.every=0"], progress=False)
    x = Pipeline.from_pretrained(tmp / "cm", device="cuda").sample(8, seed=0)
    return {"steps": result.step, "last_loss": result.last_loss, "finite": bool(torch.isfinite(x).all())}


def check_finetune(tmp: Path) -> dict:
    folder = tmp / "digits"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(folder / f"{i}.png")
    result = finetune(finetune_config(tmp / "mnist", folder, ["train.max_steps=20", "finetune.targets=[\"conv\"]"]), tmp / "lora", progress=False)
    pipe = Pipeline.from_pretrained(tmp / "mnist", device="cuda")
    pipe.load_lora(tmp / "lora")
    x = pipe.sample(8, steps=10, seed=0)
    return {"steps": result.step, "last_loss": result.last_loss, "finite": bool(torch.isfinite(x).all())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="benchmarks/results/cuda-paths.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run this on a GPU machine")
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "bf16": torch.cuda.is_bf16_supported(), "cpu": cpu_info()}
    with tempfile.TemporaryDirectory() as tmp:
        for name, check in (("training", check_training), ("resume", check_resume), ("samplers", check_samplers),
                            ("distill", check_distill), ("finetune", check_finetune)):
            start = time.perf_counter()
            try:
                results[name] = check(Path(tmp))
            except Exception:  # a failing path is a result here, and the other checks still run
                results[name] = {"error": traceback.format_exc(limit=4)}
            results[name]["seconds"] = round(time.perf_counter() - start, 1)
            print(name, json.dumps(results[name])[:400], flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
