"""ControlNet for the shipped emoji model (issue 25): train a Canny ControlNet on a CPU budget, then measure how well
images follow the control on held-out emoji, against the same prompts without the ControlNet.

    python benchmarks/controlnet.py --budget 20m --json benchmarks/results/controlnet.json
    python benchmarks/controlnet.py --smoke        # 30 s of training, 16 prompts: numbers mean nothing

The shipped model was trained on every emoji and draws each one from its name alone (at 32 px most are close to
symmetric), so a control that repeats the emoji's own layout says little it does not know. So three controls are
measured on held-out emoji (every 10th, never trained on): `swapped`, the Canny edges of another held-out emoji
(the prompt says what, the control where: ControlNet's use, and the case where following the control shows);
`mirrored`, the emoji's own edges mirrored; `aligned`, its own edges. The ControlNet trains on the training emoji
and their mirror images, each with the Canny edges of itself (annotators.py, OpenCV), with half the captions
dropped as in Zhang et al. 2023 (sec. 3.3), so it learns to draw from the edges alone too.
Edge agreement: the output's Canny edges against the control's, an edge pixel counted as matched within 1 pixel
(a 3x3 dilation of the other): precision, recall and their F1 per image, averaged. Prompt retrieval top-1: the
nearest dataset emoji (random conv features, as benchmarks/text_alignment.py) is the prompt's emoji (for
`mirrored`, of the mirrored dataset). Targets: F1 with the ControlNet >= 3x F1 without, on `swapped`; retrieval
top-1 with the ControlNet within 5 points of the base model's, on `aligned` (a control that agrees with the
prompt must not cost the prompt). A grid (control | without | with, swapped) goes to docs/controlnet_emoji.png.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from text_alignment import retrieval

from diffusekit.annotators import annotate, canny_edges, opencv
from diffusekit.controlnet_training import controlnet_config, train_controlnet
from diffusekit.data import load_dataset, to_float, to_uint8
from diffusekit.images import save_grid
from diffusekit.metrics import embed, get_feature_extractor
from diffusekit.models import default_model
from diffusekit.pipeline import Pipeline
from diffusekit.precision import cpu_info

HELD_OUT_EVERY = 10


def write_folder(folder: Path, images: torch.Tensor, captions: list[str]) -> None:
    """The training emoji as a captioned image folder (metadata.jsonl), as `train-controlnet --data` reads it."""
    from PIL import Image

    folder.mkdir(parents=True)
    lines = []
    for i, (image, text) in enumerate(zip(images, captions)):
        name = f"{i:05d}.png"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def edge_f1(generated: torch.Tensor, controls: torch.Tensor) -> dict:
    """Mean precision, recall and F1 of the generated images' Canny edges against the control edges (1-pixel tolerance)."""
    cv2, kernel = opencv(), np.ones((3, 3), np.uint8)
    scores = []
    for image, control in zip(to_uint8(generated), controls):
        out = canny_edges(np.ascontiguousarray(image.permute(1, 2, 0).numpy())) > 0
        ref = control[0].numpy() > 127
        near_ref, near_out = cv2.dilate(ref.astype(np.uint8), kernel) > 0, cv2.dilate(out.astype(np.uint8), kernel) > 0
        precision = (out & near_ref).sum() / max(out.sum(), 1)
        recall = (ref & near_out).sum() / max(ref.sum(), 1)
        scores.append((precision, recall, 2 * precision * recall / max(precision + recall, 1e-9)))
    p, r, f = (float(np.mean(column)) for column in zip(*scores))
    return {"precision": p, "recall": r, "f1": f}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="20m")
    parser.add_argument("--prompts", type=int, default=96, help="held-out emoji measured")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--out", default="runs/bench_controlnet")
    parser.add_argument("--grid", default="docs/controlnet_emoji.png")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", default="benchmarks/results/controlnet.json")
    args = parser.parse_args()
    budget, count = ("30s", 16) if args.smoke else (args.budget, args.prompts)

    base = Pipeline.from_pretrained(default_model())
    data = load_dataset(base.config.data, progress=False)
    held = torch.arange(0, len(data), HELD_OUT_EVERY)
    trained = torch.tensor([i for i in range(len(data)) if i % HELD_OUT_EVERY])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "emoji"
        captions = [data.captions[i] for i in trained.tolist()]
        write_folder(folder, torch.cat([data.images[trained], data.images[trained].flip(-1)]), captions + captions)
        config = controlnet_config(None, folder, "canny", [f'train.budget="{budget}"', "train.max_steps=1000000", "train.checkpoint_every=500",
                                                                "text.caption_dropout=0.5"])
        start = time.perf_counter()
        result = train_controlnet(config, args.out, overwrite=True)
        train_s = time.perf_counter() - start

    targets = held[torch.linspace(0, len(held) - 1, count).round().long()]
    settings = dict(prompts=[data.captions[i] for i in targets.tolist()], steps=args.steps, seed=0, batch_size=64)
    without = base.sample(count, **settings)
    steered = Pipeline.from_pretrained(default_model(), controlnet=args.out)
    extractor = get_feature_extractor("random")
    rows, grid = {}, None
    swapped = targets.roll(1)  # each prompt gets another held-out emoji's edges
    layouts = {"swapped": (data.images, swapped, data.images), "mirrored": (data.images.flip(-1), targets, data.images.flip(-1)),
               "aligned": (data.images, targets, data.images)}
    for layout, (sources, control_of, reference_images) in layouts.items():
        controls = annotate(sources[control_of], "canny")
        with_control = steered.sample(count, control_image=to_float(controls), **settings)
        reference, _ = embed(extractor, to_float(reference_images))
        rows[layout] = {}
        for label, generated in (("without", without), ("with", with_control)):
            features, _ = embed(extractor, generated)
            rows[layout][label] = {"edges": edge_f1(generated, controls), "retrieval": retrieval(features, reference, targets)}
        grid = grid if grid is not None else torch.cat([to_float(controls[:8]), without[:8], with_control[:8]])
    ratio = rows["swapped"]["with"]["edges"]["f1"] / max(rows["swapped"]["without"]["edges"]["f1"], 1e-9)
    retrieval_drop = rows["aligned"]["without"]["retrieval"]["top1"] - rows["aligned"]["with"]["retrieval"]["top1"]
    save_grid(grid, args.grid, ncols=8)
    report = {"cpu": cpu_info(), "threads": torch.get_num_threads(), "budget": budget, "smoke": args.smoke,
              "trained_steps": result.step, "train_images_per_s": result.images_per_second, "train_s": train_s,
              "held_out": len(held), "measured": count, "sampling_steps": args.steps, **rows,
              "f1_ratio": ratio, "f1_target_met": ratio >= 3, "retrieval_drop_points": 100 * retrieval_drop,
              "retrieval_target_met": retrieval_drop <= 0.05, "grid": args.grid}
    print(json.dumps(report, indent=1))
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
