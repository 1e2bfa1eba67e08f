"""Run folders: what `--resume` and `--overwrite` may do with them, and metrics.jsonl upkeep.

    RUN/config.json  RUN/metrics.jsonl  RUN/samples/  RUN/eval/  RUN/checkpoints/step_*/
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

from diffusekit.config import RESUMABLE_KEYS, RESUMABLE_SECTIONS, Config, diff_configs
from diffusekit.errors import UserError
from diffusekit.files import write_text_atomic
from diffusekit.io.checkpoint import latest_checkpoint, load_config


def overlap(a: Path, b: Path) -> str | None:
    """How the path a stands to b: "is" (the same file or folder), "holds" (b lies inside a), "lies inside" (a inside b),
    or None when they are apart. Links and '..' are resolved first."""
    ra, rb = Path(a).resolve(), Path(b).resolve()
    if ra == rb or (ra.exists() and rb.exists() and ra.samefile(rb)):
        return "is"
    return "holds" if ra in rb.parents else "lies inside" if rb in ra.parents else None


def run_inputs(config: Config, resume: bool) -> dict[str, str]:
    """{what: path} a run reads from outside its folder: the image folder, a fine-tuning run's base model and class
    images, and for a new run the autoencoder of a latent model and a distillation's teacher."""
    data, f = config.data, config.finetune
    paths = {"the image folder (data.path)": data.path if data.dataset == "folder" else ""}
    if config.task == "finetune":
        paths |= {"the base model": f.base, "the class images (--prior-data)": f.prior_path}
    elif not resume:
        paths |= {"the autoencoder (latent.vae)": config.latent.vae, "the teacher": config.distill.teacher}
    return {what: str(home_run(Path(path))) for what, path in paths.items() if path and Path(path).exists()}


def home_run(path: Path) -> Path:
    """The run folder a checkpoint sits in (RUN/checkpoints/step_*), else the path itself."""
    return path.parent.parent if path.parent.name == "checkpoints" else path


def check_run_request(run_dir: Path, config: Config, resume: bool, overwrite: bool) -> None:
    """--resume and --overwrite are one or the other; the run folder must be apart from every input (whatever the flags)."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: --resume continues the run in --out, --overwrite replaces it; give one of them")
    for what, path in run_inputs(config, resume).items():
        relation = overlap(run_dir, Path(path))
        if relation is not None:
            raise UserError(f"--out '{run_dir}' {relation} {what} '{path}', which this run reads; a run folder must be apart from its inputs: "
                            "choose another --out (nothing was written or deleted)")


def prepare_run_dir(run_dir: Path, config: Config, resume: bool, overwrite: bool) -> Path | None:
    """Check the run folder against the request (deleting nothing); returns the checkpoint to resume from, if any."""
    check_run_request(run_dir, config, resume, overwrite)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out '{run_dir}' is a file; a run needs a folder: choose a new name (e.g. runs/NAME)")
    if resume:
        return checkpoint_to_resume(run_dir, config)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise UserError(f"'{run_dir}' already holds files; pass --resume to continue that run, --overwrite to replace it, or choose another --out")
        foreign = [str(p.relative_to(run_dir)) for p in run_contents(run_dir) if not is_run_file(p.relative_to(run_dir))]
        if foreign:
            raise UserError(
                f"--overwrite would delete '{run_dir}', which holds files that are not part of a diffusekit run (diffusekit did not write them) "
                f"({', '.join(foreign[:3])}); move them out or choose another --out"
            )
    return None


def checkpoint_to_resume(run_dir: Path, config: Config) -> Path:
    """The run's latest checkpoint, intact and trained with a config that `config` may continue."""
    ckpt = latest_checkpoint(run_dir)  # the newest intact one, with a warning if it passed a damaged one over
    if ckpt is None:
        raise UserError(f"nothing to resume in '{run_dir}': it has no intact checkpoint; drop --resume to start a new run there")
    saved = load_config(ckpt)
    clashes = [(k, a, b) for k, a, b in diff_configs(saved, config) if k not in RESUMABLE_KEYS and k.split(".")[0] not in RESUMABLE_SECTIONS]
    if clashes:
        listed = "; ".join(f"{k}: {a!r} in the run, {b!r} asked" for k, a, b in clashes[:5])
        raise UserError(
            f"the checkpoint in '{run_dir}' was trained with another config ({listed}); resume without those "
            "--set changes, or start a new run with another --out"
        )
    return ckpt


# What diffusekit writes into a run folder, by name: RUN/config.json, RUN/metrics.jsonl, sample grids
# (and their prompts), evaluation reports, checkpoint folders, the `latest` pointer, a fine-tuning run's LoRA,
# a ControlNet run's controlnet/ folder and what a killed write leaves behind (.NAME.*.tmp files, .tmp-* folders).
# --overwrite deletes these and nothing else.
RUN_FILE_PATTERNS = (
    "config.json", "metrics.jsonl", ".config.json.*", ".metrics.jsonl.*",
    "samples/step_*.png", "samples/step_*.json", "samples/.step_*",
    "eval/*eval-*.json", "eval/.*eval-*",
    "checkpoints/latest", "checkpoints/.latest.*", "checkpoints/step_*/*", "checkpoints/.tmp-*/*",
    "students/*-steps/*", "students/.tmp-*/*",  # a progressive distillation's students of its earlier stages
    "lora.safetensors", ".lora.safetensors.*",  # a `diffusekit finetune` run's LoRA
    "controlnet/*", ".tmp-controlnet-*/*", ".tmp-controlnet-*/old/*",  # a `train-controlnet` run's ControlNet folder (diffusers' layout)
)


def is_run_file(relative: Path) -> bool:
    return any(fnmatch.fnmatchcase(relative.as_posix(), pattern) for pattern in RUN_FILE_PATTERNS)


def run_contents(run_dir: Path) -> list[Path]:
    """Every file in a run folder (symbolic links as files, never followed)."""
    return sorted(p for p in run_dir.rglob("*") if p.is_symlink() or not p.is_dir())


RUN_FOLDER_PATTERNS = ("samples", "eval", "checkpoints", "checkpoints/step_*", "checkpoints/.tmp-*", "students", "students/*-steps", "students/.tmp-*",
                       "controlnet", ".tmp-controlnet-*", ".tmp-controlnet-*/old")


def clear_run_dir(run_dir: Path) -> None:
    """Delete a run's own files, then its own folders that this leaves empty (prepare_run_dir has checked
    that nothing else is there)."""
    for path in run_contents(run_dir):
        if is_run_file(path.relative_to(run_dir)):
            path.unlink()
    for pattern in reversed(RUN_FOLDER_PATTERNS):  # the deepest first
        for folder in run_dir.glob(pattern):
            if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
                folder.rmdir()


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
