"""Training speed of the `mnist` preset in 1 and 2 processes (DDP, gloo on the CPU), as JSON.

    python benchmarks/ddp_speed.py --json benchmarks/results/ddp_speed.json

Every layout trains the same global batch (the preset's train.batch_size, split over the
processes) with the real trainer step (DistributedDataParallel, gradient averaging), in
fresh processes started by this script, one layout after the other:

    1x1  1 process  x 1 thread
    1x2  1 process  x 2 threads   (what one process gets on a 2-core machine)
    2x1  2 processes x 1 thread   (the same 2 cores, shared by DDP)

images/s counts the images of the global batch per second of training steps (after warm-up
steps; data, t and noise included; no checkpoints or samples).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffusekit import distributed
from diffusekit.config import apply_overrides, load_preset
from diffusekit.diffusion_training import DiffusionRecipe
from diffusekit.trainer import Trainer

LAYOUTS = [(1, 1), (1, 2), (2, 1)]  # (processes, threads per process)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(rank: int, world: int, threads: int, port: int, args, out: Path) -> None:
    """One process of a layout: warm up, then time args.steps trainer steps (rank 0 writes the result)."""
    if world > 1:
        os.environ.update(distributed.one_machine_env(rank, world, port))
    with distributed.process_group("cpu"):
        preset = load_preset(args.preset)
        per_rank = preset.train.batch_size // world
        config = apply_overrides(preset, [*args.set, "train.device=cpu", f"train.threads={threads}", f"train.batch_size={per_rank}"])
        with tempfile.TemporaryDirectory() as run_dir:  # the trainer writes nothing outside run()
            trainer = Trainer(config, run_dir, DiffusionRecipe, progress=False)
            trainer.net.train()
            for i in range(args.warmup + args.steps):
                if i == args.warmup:
                    distributed.barrier()
                    start = time.perf_counter()
                trainer.set_learning_rates()
                trainer.train_step()
            distributed.barrier()
            seconds = time.perf_counter() - start
        if rank == 0:
            images = trainer.global_batch * args.steps
            out.write_text(json.dumps({"processes": world, "threads_per_process": threads, "global_batch": trainer.global_batch,
                                       "batch_per_process": per_rank, "steps": args.steps, "seconds": seconds, "images_per_s": images / seconds}))


def run_layout(world: int, threads: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        torch.multiprocessing.spawn(measure, args=(world, threads, free_port(), args, out), nprocs=world, join=True)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mnist")
    parser.add_argument("--set", action="append", default=[], help="config overrides, as for `diffusekit train`")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per layout")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--note", default="", help="what to record about the machine's state (e.g. other load)")
    parser.add_argument("--json", default="benchmarks/results/ddp_speed.json")
    args = parser.parse_args()

    results = {f"{world}x{threads}": run_layout(world, threads, args) for world, threads in LAYOUTS}
    for name, result in results.items():
        print(f"{name}: {result['images_per_s']:.1f} images/s", file=sys.stderr)
    report = {
        "preset": args.preset,
        "overrides": args.set,
        "layouts": results,
        "speedup_2x1_vs_1x2": results["2x1"]["images_per_s"] / results["1x2"]["images_per_s"],
        "speedup_2x1_vs_1x1": results["2x1"]["images_per_s"] / results["1x1"]["images_per_s"],
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(), "backend": "gloo"},
        "note": args.note,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
