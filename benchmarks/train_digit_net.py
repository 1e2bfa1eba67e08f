"""Train the digit feature network (diffusekit/nn/digits.py) on the built-in MNIST digits.

    .venv/bin/python benchmarks/train_digit_net.py            # writes src/diffusekit/assets/digit_net.{safetensors,json}

4,000 digits train it, with small random rotations, scalings and shifts; the
1,000 of `heldout_split()` are never seen and measure its accuracy. Seeded: a
rerun on the same machine and torch version writes the same weights. A couple
of minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffusekit.data import to_float
from diffusekit.data.mnist import load_mnist
from diffusekit.devices import use_all_cores
from diffusekit.files import write_json_atomic
from diffusekit.nn.digits import HELDOUT_SEED, DigitNet, digit_net_weights_path, heldout_split


def random_affine(images: torch.Tensor, generator: torch.Generator, degrees: float = 12.0, scale: float = 0.1, shift_px: float = 2.0) -> torch.Tensor:
    """Rotate by U(-degrees, degrees), scale by U(1 - scale, 1 + scale), shift by U(-shift_px, shift_px) pixels.

    The background (-1) stays -1: the warp runs on images + 1, whose padding value 0 is background.
    """
    n, _, h, _ = images.shape
    uniform = lambda low, high: low + (high - low) * torch.rand(n, generator=generator)  # noqa: E731
    angle = uniform(-degrees, degrees) * math.pi / 180
    zoom = uniform(1 - scale, 1 + scale)
    shift = torch.stack([uniform(-shift_px, shift_px), uniform(-shift_px, shift_px)], dim=1) * 2 / h
    cos, sin = angle.cos() / zoom, angle.sin() / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


@torch.no_grad()
def accuracy(net: DigitNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    net.eval()
    _, logits = net(images)
    return (logits.argmax(1) == labels).float().mean().item()


def train(images: torch.Tensor, labels: torch.Tensor, epochs: int, batch_size: int, lr: float, seed: int) -> DigitNet:
    """AdamW with a one-cycle learning rate, label smoothing 0.05, fresh augmentation every batch."""
    torch.manual_seed(seed)
    net = DigitNet()
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        net.train()
        order, total = torch.randperm(len(images), generator=generator), 0.0
        for start in range(0, len(images), batch_size):
            batch = order[start : start + batch_size]
            _, logits = net(random_affine(images[batch], generator))
            loss = F.cross_entropy(logits, labels[batch], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(images):.4f}", flush=True)
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=digit_net_weights_path(), help="the .safetensors file; the JSON report goes beside it")
    args = parser.parse_args()

    threads = use_all_cores()
    uint8_images, labels = load_mnist()
    images = to_float(uint8_images)
    train_idx, heldout_idx = heldout_split(len(images))
    began = time.perf_counter()
    net = train(images[train_idx], labels[train_idx], args.epochs, args.batch_size, args.lr, args.seed)
    seconds = time.perf_counter() - began
    heldout_accuracy = accuracy(net, images[heldout_idx], labels[heldout_idx])

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(args.out))
    report = {
        "heldout_accuracy": round(heldout_accuracy, 4),
        "train_accuracy": round(accuracy(net, images[train_idx], labels[train_idx]), 4),
        "train_images": len(train_idx),
        "heldout_images": len(heldout_idx),
        "heldout_seed": HELDOUT_SEED,
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "train_seconds": round(seconds, 1),
        "threads": threads,
        "weights_bytes": args.out.stat().st_size,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    write_json_atomic(args.out.with_suffix(".json"), report)
    print(f"held-out accuracy {heldout_accuracy:.4f} after {seconds:.0f} s; wrote {args.out} ({report['weights_bytes']} bytes)")


if __name__ == "__main__":
    main()
