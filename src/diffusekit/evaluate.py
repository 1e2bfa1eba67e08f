"""Evaluate sample quality: samples (from a checkpoint or a folder) against a reference set.

    report = evaluate_checkpoint("runs/mnist", n=2000, sampler="dpmpp_2m", steps=20)
    report = evaluate_images(images, reference="mnist")

Features: "mnist" (the shipped digit network: FD-MNIST, KID, precision/recall,
and the class histogram / label accuracy of generated digits), "inception" (FID;
needs a local weights file) or "random" (a fixed random conv net: the fallback for
other data, good for comparing runs on the same data, not across datasets).
Reference features are cached on disk, keyed by the reference data and extractor.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from diffusekit.data import to_float
from diffusekit.data.mnist import digit_caption
from diffusekit.errors import UserError
from diffusekit.files import cache_dir, read_cached_tensors, save_tensors_atomic, write_json_atomic
from diffusekit.metrics import class_histogram, compare_features, embed, fd_from_features, get_feature_extractor, label_accuracy, psnr, ssim

NUM_DIGITS = 10


def default_features(reference: str) -> str:
    return "mnist" if reference == "mnist" else "random"


BUILT_IN = ("mnist", "emoji")


def reference_images(reference: str, size: int, channels: int) -> torch.Tensor:
    """The reference set as float images in [-1, 1]: a built-in dataset ("mnist": all 5,000 digits,
    "emoji": every emoji) or an image folder."""
    if reference in BUILT_IN:
        from diffusekit.config import DataConfig
        from diffusekit.data import load_dataset

        return to_float(load_dataset(DataConfig(dataset=reference, image_size=size, channels=channels), progress=False).images)
    from diffusekit.data.folder import load_folder

    images, _, _ = load_folder(reference, size, channels, bad_images="skip", progress=True)
    return to_float(images)


def _reference_key(reference: str, features: str, weights, size: int, channels: int) -> str:
    parts = [reference, features, str(weights or ""), str(size), str(channels)]
    if reference not in BUILT_IN:
        root = Path(reference)
        if not root.is_dir():
            raise UserError(f"reference '{reference}' is neither a built-in dataset ({', '.join(BUILT_IN)}) nor an image folder")
        parts += [f"{p.relative_to(root)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(root.rglob("*")) if p.is_file()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def reference_features(reference: str, features: str, extractor, weights, size: int, channels: int) -> torch.Tensor:
    """Features of the reference set, computed once and cached (a changed folder gets a new key)."""
    path = cache_dir() / "reference" / f"{features}-{_reference_key(reference, features, weights, size, channels)}.safetensors"
    cached = read_cached_tensors(path)
    if cached is not None and "features" in cached:
        return cached["features"]
    feats, _ = embed(extractor, reference_images(reference, size, channels))
    save_tensors_atomic({"features": feats}, path)
    return feats


def real_data_floor(n: int, size: int, channels: int, reference: str = "mnist", features: str | None = None, weights=None,
                    repeats: int = 3, seed: int = 0) -> dict:
    """The scores of n real images held out against the rest of the reference set, `repeats` random
    splits: what a perfect generator's n samples can expect (FD is biased upwards at small n)."""
    features = features or default_features(reference)
    real = reference_features(reference, features, get_feature_extractor(features, weights), weights, size, channels)
    if not 0 < n < len(real):
        raise UserError(f"a floor for n = {n} needs more than n reference images; the reference has {len(real)}")
    generator = torch.Generator().manual_seed(seed)
    splits = [torch.randperm(len(real), generator=generator) for _ in range(repeats)]
    reports = [compare_features(real[order[n:]], real[order[:n]], kid_subset_size=min(1000, n)) for order in splits]
    return {"n": n, "repeats": repeats, **{key: [r[key] for r in reports] for key in ("fd", "precision", "recall")}}


def evaluate_images(images: torch.Tensor, reference: str = "mnist", features: str | None = None, weights=None, wanted_labels: torch.Tensor | None = None, device: str = "cpu") -> dict:
    """Quality of `images` (float [-1, 1]) against `reference` (see module docstring)."""
    features = features or default_features(reference)
    extractor = get_feature_extractor(features, weights, device)
    size, channels = images.shape[-1], images.shape[1]
    real = reference_features(reference, features, extractor, weights, size, channels)
    fake, logits = embed(extractor, images)
    report = {"n": len(images), "reference": reference, "n_reference": len(real), "features": features}
    report.update(compare_features(real, fake, kid_subset_size=min(1000, len(real), len(fake))))
    if logits is not None and logits.shape[1] == NUM_DIGITS:
        predicted = logits.argmax(1)
        report["class_histogram"] = [round(v, 4) for v in class_histogram(predicted, NUM_DIGITS).tolist()]
        report["confidence"] = logits.softmax(1).max(1).values.mean().item()  # mean top-class probability
        if wanted_labels is not None:
            report["label_accuracy"] = label_accuracy(predicted, wanted_labels)
    return report


def evaluate_reconstructions(reconstructions: torch.Tensor, originals: torch.Tensor, features: str | None = None, weights=None) -> dict:
    """An autoencoder's reconstructions against their originals: PSNR (dB), SSIM and reconstruction FD (rFD)."""
    features = features or ("mnist" if originals.shape[1] == 1 else "random")
    extractor = get_feature_extractor(features, weights)
    real, _ = embed(extractor, originals)
    fake, _ = embed(extractor, reconstructions)
    return {
        "n": len(originals),
        "psnr": psnr(reconstructions, originals).mean().item(),
        "ssim": ssim(reconstructions, originals).mean().item(),
        "rfd": fd_from_features(real, fake),
        "features": features,
    }


def evaluate_checkpoint(
    path,
    n: int = 2000,
    sampler: str | None = None,
    steps: int | None = None,
    spacing: str | None = None,
    seed: int = 0,
    guidance: float | None = None,
    reference: str | None = None,
    features: str | None = None,
    weights=None,
    pipeline=None,
    device: str = "auto",
    precision: str = "fp32",
    compile: bool = False,
) -> dict:
    """Sample n images from a run or checkpoint and evaluate them (sampler and steps default to the
    run's eval.* settings). Digit models conditioned on classes or on captions ("a handwritten digit
    seven") are asked for digit i % 10, and their label accuracy is measured."""
    from diffusekit.pipeline import Pipeline

    pipe = pipeline or Pipeline.from_pretrained(path, device=device, dtype=precision, compile=compile)
    sampler = sampler or pipe.config.eval.sampler
    steps = pipe.config.eval.steps if steps is None else steps
    data = pipe.config.data
    reference = reference or (data.dataset if data.dataset in BUILT_IN else data.path)
    if not reference:
        raise UserError("no reference set for this model: give --ref mnist, --ref emoji or --ref DIR")
    classes = pipe.config.model.num_classes
    digits_by_text = pipe.text_encoder is not None and data.dataset == "mnist"
    wanted = torch.arange(n) % (classes or NUM_DIGITS) if classes or digits_by_text else None
    labels = wanted if classes else None
    prompts = [digit_caption(int(d)) for d in wanted] if digits_by_text else None
    conditional = labels is not None or prompts is not None
    start = time.perf_counter()
    images = pipe.sample(n, steps=steps, sampler=sampler, spacing=spacing, seed=seed, labels=labels, prompts=prompts,
                         guidance=guidance if conditional else None, progress=pipeline is None)
    seconds = time.perf_counter() - start
    report = evaluate_images(images, reference, features, weights, wanted_labels=wanted, device=str(pipe.device))
    report.update({
        "checkpoint": str(pipe.checkpoint) if pipe.checkpoint else None,
        "step": pipe.step,
        "sampler": sampler,
        "steps": steps,
        "seconds_per_image": seconds / n,
        "dtype": pipe.precision,  # what the network ran in (fp32 / bf16 / fp16)
    })
    return report


def format_report(report: dict) -> str:
    """A small table for the terminal."""
    rows = [("FD", "fd", "{:.3f}"), ("KID x 1e3", "kid_mean", "{:.3f}"), ("precision", "precision", "{:.3f}"),
            ("recall", "recall", "{:.3f}"), ("label accuracy", "label_accuracy", "{:.3f}"), ("confidence", "confidence", "{:.3f}"),
            ("s / image", "seconds_per_image", "{:.4f}")]
    lines = [f"{report['n']} samples vs {report['reference']} ({report['n_reference']} images), {report['features']} features"]
    for label, key, fmt in rows:
        if key in report:
            value = report[key] * 1e3 if key == "kid_mean" else report[key]
            lines.append(f"  {label:15s} {fmt.format(value)}")
    if "class_histogram" in report:
        lines.append("  classes         " + " ".join(f"{v:.2f}" for v in report["class_histogram"]))
    return "\n".join(lines)


def default_report_path(report: dict) -> Path:
    """RUN/eval/<name>.json for a checkpoint of a run (checkpoint folders get pruned), else ./<name>.json."""
    name = f"eval-{report['sampler']}-{report['steps']}steps-n{report['n']}.json"
    ckpt = Path(report["checkpoint"]) if report.get("checkpoint") else None
    if ckpt is not None and ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent / "eval" / f"{ckpt.name}-{name}"
    return Path(name)


def write_report(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, report)
    return path
