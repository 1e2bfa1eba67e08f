"""Does a LoRA teach the shipped emoji model a concept it has never seen, in 10 minutes on a CPU?

    python benchmarks/finetune.py                      # the real run: 10 minutes of fine-tuning, then about 3 minutes of measuring
    python benchmarks/finetune.py --smoke              # everything once, tiny (under a minute): does the script work?

The concept: 24 alchemical symbols (Unicode's Alchemical Symbols block, U+1F700, which no emoji font
draws) from the Symbola font of the Debian package fonts-symbola, each rendered like the emoji data
(data/emoji.py: the glyph centred in a 136 px cell on white, shrunk to 32 px with a Lanczos filter)
and captioned with its Unicode name ("alchemical symbol for fire"). `diffusekit finetune` trains a
rank-8 LoRA on the U-Net's attention (the default) for the budget, with prior preservation (48 class
images the base model draws first from emoji captions that are not measured; --prior-images 0: none);
then, before and after:

- retrieval of the new concept: for each caption, images from the model; is the nearest of the 24
  glyphs (fixed random conv features, as benchmarks/text_alignment.py; and raw pixels) the caption's
  own (top-1; chance 1/24)? Target: top-1 >= 80% after.
- FD (random features) between those images and the 24 glyphs.
- the base model's own prompts: the same retrieval for emoji captions spread over the emoji set,
  against all 1,899 emoji, with the LoRA at scale 1. Target: within 3 points of before.
- CPU time, wall time, steps, and the LoRA file's size (target: under 2 MB at rank 8).
- the trade-off on the way: the run stops at --measure-at steps (default 250, 500, 1000, 2000), is
  measured, and resumes (bit for bit the run without stops; the measuring is not counted in the budget),
  so "curve" says how the concept's top-1 and the base prompts' top-1 move with the steps trained.

Writes benchmarks/results/finetune.json (with the CPU model, torch's CPU capability and threads) and
docs/finetune_glyphs.png (rows: the glyphs, before, after) and docs/finetune_base_prompts.png
(emoji prompts: before, after).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from text_alignment import retrieval

from diffusekit.data import load_dataset, to_float
from diffusekit.devices import use_all_cores
from diffusekit.durations import parse_duration
from diffusekit.finetune import base_config, finetune, finetune_config
from diffusekit.images import save_grid
from diffusekit.metrics import embed, fd_from_features, get_feature_extractor
from diffusekit.models import default_model
from diffusekit.pipeline import Pipeline

FONT = Path("/usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf")  # Debian: fonts-symbola
# 24 alchemical symbols that look unlike one another (offsets from U+1F700; "air" is drawn as "fire", so it is left out)
GLYPHS = [2, 4, 10, 20, 21, 24, 28, 32, 41, 42, 50, 56, 58, 59, 71, 78, 80, 83, 85, 89, 91, 92, 107, 113]
CELL, SIZE = 136, 32  # as data/emoji.py: drawn in a 136 px cell, shrunk to the model's 32 px


def find_font(path: str | None) -> ImageFont.FreeTypeFont:
    font = Path(path or os.environ.get("SYMBOLA_FONT") or FONT)
    if not font.is_file():
        sys.exit(f"error: the benchmark draws its new concept with the Symbola font, and '{font}' is not a file; "
                 "install it with `apt-get install fonts-symbola` (or give --font PATH)")
    return ImageFont.truetype(str(font), 100)


def render(font: ImageFont.FreeTypeFont, char: str) -> Image.Image:
    """One glyph in black (a 2 px outline thickens its strokes), centred in the cell on white, shrunk to 32 px."""
    cell = Image.new("RGB", (CELL, CELL), (255, 255, 255))
    left, top, right, bottom = font.getbbox(char, stroke_width=2)
    origin = ((CELL - (right - left)) / 2 - left, (CELL - (bottom - top)) / 2 - top)
    ImageDraw.Draw(cell).text(origin, char, font=font, fill=(0, 0, 0), stroke_width=2, stroke_fill=(0, 0, 0))
    return cell.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def write_concept(font, count: int, folder: Path) -> tuple[torch.Tensor, list[str]]:
    """The glyph folder (PNGs + metadata.jsonl) that finetune reads; (images in [-1, 1], captions)."""
    folder.mkdir(parents=True, exist_ok=True)
    images, captions, lines = [], [], []
    for offset in GLYPHS[:count]:
        char = chr(0x1F700 + offset)
        image, caption = render(font, char), unicodedata.name(char).lower()
        image.save(folder / f"{offset:03d}.png")
        images.append(np.asarray(image).transpose(2, 0, 1))
        captions.append(caption)
        lines.append(json.dumps({"file_name": f"{offset:03d}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return to_float(torch.from_numpy(np.stack(images))), captions


def measure(pipe: Pipeline, glyphs, captions, emoji, emoji_targets, args, extractor, features) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Retrieval and FD of the new concept, and retrieval of the base prompts; (report, concept images, emoji images)."""
    k, options = args.per_prompt, dict(guidance=args.guidance, steps=args.sample_steps, batch_size=100)
    concept = pipe.sample(len(captions) * k, prompts=captions, seed=0, **options)  # prompts take turns: image i is caption i % N
    targets = torch.arange(len(concept)) % len(captions)
    concept_features, _ = embed(extractor, concept)
    emoji_prompts = [emoji.captions[i] for i in emoji_targets.tolist()]
    base = pipe.sample(len(emoji_prompts), prompts=emoji_prompts, seed=1, **options)
    base_features, _ = embed(extractor, base)
    report = {
        "concept_random_features": retrieval(concept_features, features["glyphs"], targets),
        "concept_pixels": retrieval(concept, glyphs, targets),
        "concept_fd_random_features": fd_from_features(features["glyphs"], concept_features),
        "base_prompts_random_features": retrieval(base_features, features["emoji"], emoji_targets),
    }
    print(json.dumps(report), flush=True)
    return report, concept, base


def step_list(text: str) -> list[int]:
    """--measure-at: comma-separated positive step counts, sorted ('' for none)."""
    steps = sorted({int(part) for part in text.split(",") if part.strip()})
    if any(step < 1 for step in steps):
        raise ValueError(text)
    return steps


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="10m", help="fine-tuning time (wall clock)")
    parser.add_argument("--glyphs", type=int, default=len(GLYPHS), help=f"how many of the {len(GLYPHS)} symbols")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more finetune config overrides, e.g. train.lr=5e-4")
    parser.add_argument("--prior-images", type=int, default=48,
                        help="prior preservation: class images the base draws from emoji captions other than the measured ones (0: none)")
    parser.add_argument("--measure-at", type=step_list, default="250,500,1000,2000",
                        help="also measure after these many steps on the way (comma-separated; '' for the end only)")
    parser.add_argument("--per-prompt", type=int, default=4, help="images per concept caption when measuring")
    parser.add_argument("--base-prompts", type=int, default=300, help="emoji captions (spread over the set) for the base model's retrieval")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: every core)")
    parser.add_argument("--font", help=f"the Symbola font file (default {FONT})")
    parser.add_argument("--work", default="runs/bench-finetune", help="where the glyph folder and the fine-tuning run go")
    parser.add_argument("--json", default="benchmarks/results/finetune.json")
    parser.add_argument("--grids", default="docs")
    parser.add_argument("--smoke", action="store_true", help="a tiny run of every part (6 glyphs, 3 steps, 8 base prompts), outputs in a temporary folder")
    args = parser.parse_args()
    if args.smoke:
        tmp = Path(tempfile.mkdtemp(prefix="finetune-smoke-"))
        args.glyphs, args.per_prompt, args.base_prompts, args.sample_steps = 6, 1, 8, 4  # top-5 retrieval needs 5 glyphs
        args.threads = 1  # on a machine others use too, two threads that wait for each other crawl
        args.work, args.json, args.grids, args.budget = str(tmp / "work"), str(tmp / "finetune.json"), str(tmp), ""
        args.set = [*args.set, "sample.steps=4", "sample.n=4"]
        args.measure_at = [2, 3]
        args.prior_images = args.prior_images and 4

    threads = use_all_cores(args.threads)
    font, work = find_font(args.font), Path(args.work)
    glyphs, captions = write_concept(font, args.glyphs, work / "data")
    emoji = load_dataset(base_config(None).data, progress=False)
    emoji_targets = torch.linspace(0, len(emoji) - 1, args.base_prompts).round().long()
    extractor = get_feature_extractor("random")
    features = {"glyphs": embed(extractor, glyphs)[0], "emoji": embed(extractor, to_float(emoji.images))[0]}

    pipe = Pipeline.from_pretrained(default_model())
    use_all_cores(args.threads)  # from_pretrained takes every core
    before, concept_before, base_before = measure(pipe, glyphs, captions, emoji, emoji_targets, args, extractor, features)

    overrides = [f"finetune.rank={args.rank}", f"train.threads={args.threads}"]
    if args.prior_images:
        others = sorted(set(range(len(emoji))) - set(emoji_targets.tolist()))  # not the measured prompts
        prior_prompts = [emoji.captions[others[i]] for i in torch.linspace(0, len(others) - 1, args.prior_images).round().long().tolist()]
        overrides += [f"finetune.prior_images={args.prior_images}", f"finetune.prior_prompts={json.dumps(prior_prompts)}"]
    stages = args.measure_at
    budget = parse_duration(args.budget) if args.budget else None
    stops = [*stages, *([None] if budget is not None or not stages else [])]  # None: on to the end of the budget
    curve, cpu_seconds, wall_seconds = [], 0.0, 0.0
    for stop in stops:  # one run, stopped and resumed (bit for bit the run without stops), measured at each stop
        left = None if budget is None else budget - wall_seconds
        if left is not None and left < 1:
            break  # the budget is spent
        limits = [f"train.max_steps={stop or 1_000_000}", *([f'train.budget="{left:.0f}s"'] if left is not None else [])]
        config = finetune_config(None, work / "data", [*overrides, *args.set, *limits])
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        result = finetune(config, work / "run", resume=bool(curve), overwrite=not curve, progress=not args.smoke)
        cpu_seconds, wall_seconds = cpu_seconds + time.process_time() - cpu_start, wall_seconds + time.perf_counter() - wall_start
        lora_file = result.run_dir / "lora.safetensors"
        pipe.load_lora(lora_file, name="lora")
        after, concept_after, base_after = measure(pipe, glyphs, captions, emoji, emoji_targets, args, extractor, features)
        pipe.unload_lora("lora")
        curve.append({"steps": result.step, "finetune_wall_s": wall_seconds, "finetune_cpu_s": cpu_seconds,
                      "concept_top1": after["concept_random_features"]["top1"], "base_prompts_top1": after["base_prompts_random_features"]["top1"]})
        if result.stopped_by == "budget":
            break

    shown = min(12, len(captions))
    rows = [glyphs[:shown], concept_before[:shown], concept_after[:shown]]
    grid_glyphs = save_grid(torch.cat(rows), Path(args.grids) / "finetune_glyphs.png", ncols=shown)
    grid_base = save_grid(torch.cat([base_before[:12], base_after[:12]]), Path(args.grids) / "finetune_base_prompts.png", ncols=min(12, len(base_before)))
    top1 = {"before": before["concept_random_features"]["top1"], "after": after["concept_random_features"]["top1"]}
    base_drop = 100 * (before["base_prompts_random_features"]["top1"] - after["base_prompts_random_features"]["top1"])
    report = {
        "what": "LoRA fine-tuning of the shipped emoji model on alchemical symbols it has never seen (benchmarks/finetune.py)",
        "smoke": args.smoke, "cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": threads,
        "torch": torch.__version__, "budget": args.budget, "steps": result.step, "stopped_by": result.stopped_by,
        "train_images_per_s": result.images_per_second, "finetune_wall_s": wall_seconds, "finetune_cpu_s": cpu_seconds,
        "lora_rank": args.rank, "lora_bytes": lora_file.stat().st_size, "prior_images": args.prior_images, "overrides": args.set,
        "glyphs": len(captions), "captions": captions, "per_prompt": args.per_prompt, "base_prompts": args.base_prompts,
        "guidance": args.guidance, "sample_steps": args.sample_steps, "chance_top1": 1 / len(captions),
        "before": before, "after": after, "concept_top1": top1, "base_prompts_top1_drop_points": base_drop,
        "targets": {"concept_top1_after_at_least_0.8": top1["after"] >= 0.8, "lora_under_2MB": lora_file.stat().st_size < 2e6,
                    "base_prompts_within_3_points": base_drop <= 3},
        "grids": [str(grid_glyphs), str(grid_base)],
        "curve": curve,  # the same run measured on the way: its LoRA after each --measure-at stop and at the end
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("steps", "finetune_cpu_s", "lora_bytes", "concept_top1", "base_prompts_top1_drop_points", "targets")}))
    print(f"wrote {args.json}, {grid_glyphs} and {grid_base}")


if __name__ == "__main__":
    main()
