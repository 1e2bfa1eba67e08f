"""Checkpoints: safetensors for tensors, JSON for everything else; never pickle.

    RUN/checkpoints/step_00001000/
        config.json           the full config: enough to rebuild the model
        model.safetensors     raw weights
        ema.safetensors       EMA weights (what sampling uses by default)
        optimizer.safetensors optimizer moments, as flat tensors ("state.<param>.<name>")
        rng.safetensors       RNG states (torch CPU, the training generator, CUDA)
        state.json            step, data position, optimizer hyper-parameters, ...
    RUN/checkpoints/latest    the name of the newest complete checkpoint

A checkpoint is written into a temporary folder (`.tmp-step_N-*`), flushed to disk and
renamed into place, and only then does `latest` (itself replaced atomically) point at
it: a crash mid-save never leaves a half-written checkpoint that looks complete, and
what such a crash leaves behind is removed at the next start (remove_stale_temp_files).

A checkpoint damaged later (a file cut short, a garbled `latest`) is passed over:
latest_checkpoint, which resuming and sampling both use, takes the newest intact one
with one warning. The damaged folder is kept; when training reaches its step again it
is renamed step_N.damaged to make room for the new checkpoint.

load_parts reads a run or checkpoint folder into models.ModelParts (the config's networks with their weights).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from diffusekit.config import Config, config_from_dict
from diffusekit.distributed import launched_rank
from diffusekit.errors import UserError, warn
from diffusekit.files import TEMP_PREFIX, fsync_folder, make_temp_folder, read_json, read_tensors, save_tensors_atomic, write_text_atomic
from diffusekit.models import ModelParts, build_parts

LATEST = "latest"
WEIGHT_FILES = {"ema": "ema.safetensors", "model": "model.safetensors"}
STEP_FOLDER = re.compile(r"step_(\d+)")  # a checkpoint's folder name (not step_N.damaged)


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(ckpt: Path) -> int:
    return int(STEP_FOLDER.fullmatch(ckpt.name).group(1))


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict, config: dict, keep: int = 2) -> Path:
    """Write checkpoints/step_N/ atomically, point `latest` at it, keep the newest `keep`."""
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / checkpoint_name(step)
    tmp = make_temp_folder(final)
    try:
        for name, group in tensors.items():
            save_tensors_atomic(group, tmp / f"{name}.safetensors", sync=False)  # fsync_folder below flushes them
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        fsync_folder(tmp)  # the files reach the disk before the folder's new name does
        if final.exists():
            make_room(final)
        os.replace(tmp, final)
        fsync_folder(folder, files=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(folder / LATEST, final.name + "\n")
    prune_checkpoints(folder, keep, final)
    return final


def make_room(final: Path) -> None:
    """Clear the way for a new checkpoint of the same step. An incomplete folder (no state.json) or an intact
    checkpoint (a resume from an earlier one redid its steps) is replaced; a damaged one is renamed
    step_N.damaged (or .damaged-2, ...) and kept, with a warning."""
    problem = checkpoint_damage(final) if (final / "state.json").is_file() else None
    if problem is None:
        shutil.rmtree(final)
        return
    names = (f"{final.name}.damaged" + (f"-{i}" if i > 1 else "") for i in itertools.count(1))
    aside = next(final.with_name(name) for name in names if not final.with_name(name).exists())
    os.replace(final, aside)
    warn(f"{problem}; that checkpoint is kept as {aside.name}, and {final.name} is written anew")


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete what saves killed midway left in RUN/checkpoints: `.tmp-*` folders and half-written
    `latest` pointers. Call it only when no save is running (at the start of a run)."""
    folder = Path(run_dir) / "checkpoints"
    stale = sorted([*folder.glob(f"{TEMP_PREFIX}*"), *folder.glob(f".{LATEST}.*")]) if folder.is_dir() else []
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def list_checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoint folders (step_N with a state.json), oldest first."""
    found = [p for p in folder.glob("step_*") if STEP_FOLDER.fullmatch(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=checkpoint_step)


def prune_checkpoints(folder: Path, keep: int, newest: Path) -> None:
    """Keep the newest `keep` checkpoints up to `newest`, the one just written. Later ones (left by a resume
    from an earlier checkpoint) stay until the run reaches their step and make_room replaces them."""
    latest = (folder / LATEST).read_text().strip()
    done = [c for c in list_checkpoints(folder) if checkpoint_step(c) <= checkpoint_step(newest)]
    for old in done[:-keep]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


_warned: set[str] = set()  # the warnings warn_once gave


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint to resume or sample from: the one `latest` names if it is intact, else the newest intact
    step_* folder, with one warning naming what was passed over (and left as it is). None: no intact checkpoint."""
    found, problems = find_checkpoint(run_dir)
    if problems:
        outcome = f"using the newest intact checkpoint, {found.name}, instead (nothing is deleted)" if found else "no checkpoint of this run is intact"
        warn_once(f"{'; '.join(problems)}; {outcome}")
    return found


def find_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """latest_checkpoint's choice, without a warning: (the checkpoint or None, what is wrong with those passed over)."""
    folder = Path(run_dir) / "checkpoints"
    pointer = folder / LATEST
    named = pointed_at(pointer)
    if named is None:
        problems = [f"'{pointer}' names no complete checkpoint"] if pointer.is_file() else []
    elif (problem := checkpoint_damage(named)) is None:
        return named, []
    else:
        problems = [problem]
    for ckpt in reversed(list_checkpoints(folder)):
        if ckpt == named:
            continue
        if (problem := checkpoint_damage(ckpt)) is None:
            return ckpt, problems
        problems.append(problem)
    return None, problems


def warn_once(message: str) -> None:
    """A warning given once per process, by the first rank (a resume looks its checkpoint up several times)."""
    if message not in _warned and launched_rank() == 0:
        _warned.add(message)
        warn(message)


def pointed_at(pointer: Path) -> Path | None:
    """The checkpoint folder the `latest` file names, if it names one."""
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, ValueError):
        return None
    path = pointer.parent / name
    return path if STEP_FOLDER.fullmatch(name) and (path / "state.json").is_file() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (its latest checkpoint) or a checkpoint folder -> the checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"'{path}' does not exist; give a run folder (e.g. runs/mnist) or one of its checkpoints/step_* folders")
    if (path / "config.json").is_file() and any((path / name).is_file() for name in WEIGHT_FILES.values()):
        return path
    found, problems = find_checkpoint(path)
    if found is None and problems:
        raise UserError(f"no checkpoint of the run '{path}' is intact: {'; '.join(problems)}; give another run, or train it again")
    if found is None:
        raise UserError(f"'{path}' is neither a run folder with a checkpoint nor a checkpoint folder (no checkpoints/latest, no *.safetensors weights)")
    return latest_checkpoint(path)  # the same one, with the warning of what it passed over


SAMPLING_FILES = ("ema.safetensors", "vae.safetensors")  # with config.json and state.json: all that sampling reads


def write_sampling_checkpoint(path: str | Path, out: str | Path, half: bool = False) -> Path:
    """A checkpoint with only what sampling needs (config, step, EMA weights, a latent model's VAE),
    optionally stored in float16 (half the size; sampling runs in float32 all the same)."""
    ckpt, out = resolve_checkpoint(path), Path(out)
    if not (ckpt / "ema.safetensors").is_file():
        raise UserError(f"'{ckpt}' has no EMA weights (ema.safetensors) to keep")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"'{out}' already exists and is not an empty folder; choose a new folder for the slim checkpoint")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_folder(out)
    try:
        for name in SAMPLING_FILES:
            if (ckpt / name).is_file():
                tensors = read_tensors(ckpt / name)
                if half:
                    tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
                save_tensors_atomic(tensors, tmp / name, sync=False)
        state = read_json(ckpt / "state.json", "training state")
        (tmp / "state.json").write_text(json.dumps({k: state[k] for k in ("step", "images_seen", "train_seconds") if k in state}) + "\n")
        shutil.copyfile(ckpt / "config.json", tmp / "config.json")
        fsync_folder(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)  # all or nothing
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_config(ckpt: Path) -> Config:
    """The config saved beside a checkpoint's weights (enough to rebuild its networks)."""
    return config_from_dict(read_json(Path(ckpt) / "config.json", "config"), where=f"{ckpt}/config.json")


def checkpoint_damage(ckpt: Path) -> str | None:
    """What makes a checkpoint unusable (a file missing, cut short or unreadable; headers only: fast), None if intact."""
    try:
        read_json(ckpt / "config.json", "config")
        read_json(ckpt / "state.json", "training state")
    except UserError as err:
        return str(err)
    if not any((ckpt / name).is_file() for name in WEIGHT_FILES.values()):
        return f"'{ckpt}' has no weights ({' or '.join(WEIGHT_FILES.values())})"
    for path in sorted(ckpt.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            return f"'{path}' is damaged ({err})"
    return None


def check_intact(ckpt: Path) -> None:
    """Raise a UserError if a file of the checkpoint is missing, cut short or unreadable."""
    problem = checkpoint_damage(ckpt)
    if problem is not None:
        raise UserError(f"{problem}; the checkpoint '{ckpt}' cannot be used")


def load_weights(ckpt: Path, which: str = "ema") -> dict[str, torch.Tensor]:
    """EMA weights by default; raw weights with which='model' (or when no EMA was saved)."""
    path = Path(ckpt) / WEIGHT_FILES[which]
    if which == "ema" and not path.is_file():
        path = Path(ckpt) / WEIGHT_FILES["model"]
    return read_tensors(path)


# ----------------------------------------------------------------------------- optimizer state


def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state dict -> (tensors for safetensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in rest.get("scalars", {}).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def load_parts(path: str | Path, weights: str = "ema") -> ModelParts:
    """A diffusekit run or checkpoint folder: its config, and its EMA (or raw, weights="model") weights."""
    ckpt = resolve_checkpoint(path)
    config = load_config(ckpt)
    if config.task == "finetune":
        model = f" --model {config.finetune.base}" if config.finetune.base else ""  # "": the shipped demo model
        raise UserError(f"'{path}' is a LoRA fine-tuning run, not a whole model: sample its base model with the LoRA, "
                        f"e.g. diffusekit generate PROMPT{model} --lora {path}")
    if config.task != "diffusion":
        raise UserError(f"'{path}' holds an {config.task} (from train-vae), not a diffusion model: sample from a diffusion run")
    vae_weights = read_tensors(ckpt / "vae.safetensors") if config.latent.vae else None
    state = read_json(ckpt / "state.json", "training state")
    return build_parts(config, load_weights(ckpt, weights), vae_weights, ckpt, state.get("step"))
