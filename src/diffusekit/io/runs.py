"""Run folders: what `--resume` and `--overwrite` may do with them, and metrics.jsonl upkeep.

    RUN/config.json  RUN/metrics.jsonl  RUN/samples/  RUN/eval/  RUN/checkpoints/step_*/
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from diffusekit.config import RESUMABLE_KEYS, RESUMABLE_SECTIONS, Config, diff_configs
from diffusekit.errors import UserError
from diffusekit.files import write_text_atomic
from diffusekit.io.checkpoint import latest_checkpoint, load_config


def prepare_run_dir(run_dir: Path, config: Config, resume: bool, overwrite: bool) -> Path | None:
    """Check the run folder against the request (deleting nothing); returns the checkpoint to resume from, if any."""
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise UserError(f"nothing to resume in '{run_dir}': it has no complete checkpoint; drop --resume to start a new run there")
        saved = load_config(ckpt)
        clashes = [(k, a, b) for k, a, b in diff_configs(saved, config) if k not in RESUMABLE_KEYS and k.split(".")[0] not in RESUMABLE_SECTIONS]
        if clashes:
            listed = "; ".join(f"{k}: {a!r} in the run, {b!r} asked" for k, a, b in clashes[:5])
            raise UserError(
                f"the checkpoint in '{run_dir}' was trained with another config ({listed}); resume without those "
                "--set changes, or start a new run with another --out"
            )
        return ckpt
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise UserError(f"'{run_dir}' already holds files; pass --resume to continue that run, --overwrite to replace it, or choose another --out")
        foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_ENTRIES)
        if foreign:
            raise UserError(
                f"--overwrite would delete '{run_dir}', which holds files that are not part of a diffusekit run "
                f"({', '.join(foreign[:3])}); choose another --out"
            )
    return None


RUN_ENTRIES = {"config.json", "metrics.jsonl", "checkpoints", "samples", "eval"}  # what a run folder holds


def clear_run_dir(run_dir: Path) -> None:
    """Delete a run's own files (prepare_run_dir has checked that nothing else is there)."""
    for name in RUN_ENTRIES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def drop_records_after(metrics: Path, step: int) -> None:
    """Keep the metrics.jsonl lines up to `step` (a resumed run redoes the steps after its checkpoint),
    and drop a line cut short by a kill."""
    if not metrics.is_file():
        return
    kept = []
    for line in metrics.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, AttributeError):
            continue
    write_text_atomic(metrics, "".join(kept))
