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
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffusekit.errors import UserError

LATEST = "latest"
TEMP_PREFIX = ".tmp-"  # checkpoint folders being written
WEIGHT_FILES = {"ema": "ema.safetensors", "model": "model.safetensors"}


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict, config: dict, keep: int = 2) -> Path:
    """Write checkpoints/step_N/ atomically, point `latest` at it, keep the newest `keep`."""
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / checkpoint_name(step)
    tmp = make_temp_folder(final)
    try:
        for name, group in tensors.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, tmp / f"{name}.safetensors")
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        fsync_folder(tmp)  # the files reach the disk before the folder's new name does
        if final.exists():  # an incomplete folder of that step (a crash before `latest` moved on)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_folder(folder, files=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(folder / LATEST, final.name + "\n")
    prune_checkpoints(folder, keep)
    return final


def fsync_folder(folder: Path, files: bool = True) -> None:
    """Flush a folder's files (optional) and its entries to disk, so that a power cut after a rename
    cannot leave the new name pointing at empty files."""
    for path in [p for p in folder.iterdir() if p.is_file()] if files else []:
        fsync_path(path)
    with contextlib.suppress(OSError):  # some file systems cannot sync a folder
        fsync_path(folder)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """The complete checkpoint folders, oldest first."""
    return sorted(p for p in folder.glob("step_*") if (p / "state.json").is_file())


def prune_checkpoints(folder: Path, keep: int) -> None:
    latest = (folder / LATEST).read_text().strip()
    for old in list_checkpoints(folder)[:-keep]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (its latest checkpoint) or a checkpoint folder -> the checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"'{path}' does not exist; give a run folder (e.g. runs/mnist) or one of its checkpoints/step_* folders")
    if (path / "config.json").is_file() and any((path / name).is_file() for name in WEIGHT_FILES.values()):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise UserError(f"'{path}' is neither a run folder with a checkpoint nor a checkpoint folder (no checkpoints/latest, no *.safetensors weights)")
    return found


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
                save_file(tensors, str(tmp / name))
        state = read_json(ckpt / "state.json", "training state")
        (tmp / "state.json").write_text(json.dumps({k: state[k] for k in ("step", "images_seen", "train_seconds") if k in state}) + "\n")
        shutil.copyfile(ckpt / "config.json", tmp / "config.json")
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        fsync_folder(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)  # all or nothing
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def make_temp_folder(final: Path) -> Path:
    """A temporary folder beside `final`, to be renamed into place; readable like any folder (mkdtemp makes it private)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{final.name}-", dir=final.parent))
    os.chmod(tmp, 0o755)
    return tmp


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """safetensors (with an optional string-to-string header `metadata`) written to a unique temporary
    file beside `path`, flushed, then renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        fsync_path(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_cached_tensors(path: str | Path) -> dict[str, torch.Tensor] | None:
    """A cache file's tensors, or None when it is missing or damaged (a cache is rebuilt, never trusted blindly)."""
    try:
        return load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError):
        return None


def read_json(path: Path, what: str, container: str = "the checkpoint") -> dict:
    """A JSON object from a file; a missing, unreadable or non-object file is a UserError naming `what` and `container`."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{what} '{path}' is missing; {container} is incomplete") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{what} '{path}' cannot be read as JSON ({err}); {container} is damaged") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} '{path}' is not a JSON object; {container} is damaged")
    return data


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise UserError(f"'{path}' is missing; the checkpoint is incomplete") from None
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read '{path}' ({err}); the file is damaged or not a safetensors file") from None


def load_weights(ckpt: Path, which: str = "ema") -> dict[str, torch.Tensor]:
    """EMA weights by default; raw weights with which='model' (or when no EMA was saved)."""
    path = Path(ckpt) / WEIGHT_FILES[which]
    if which == "ema" and not path.is_file():
        path = Path(ckpt) / WEIGHT_FILES["model"]
    return read_tensors(path)


def load_state_dict_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with one clear message when the weights belong to another model."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        details = []
        if wrong:
            details.append(f"{len(wrong)} shape mismatch(es), e.g. {wrong[0]}")
        if missing:
            details.append(f"{len(missing)} missing, e.g. {missing[0]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        raise UserError(
            f"the weights in {source} do not fit this model's config ({'; '.join(details)}); "
            "they come from a model of another shape: use the config.json saved with those weights"
        )
    module.load_state_dict(state)


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
