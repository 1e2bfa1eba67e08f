"""Files on disk: one atomic writer for everything diffusekit writes, and careful readers.

Every file (an image, a config, a checkpoint's JSON, a cache shard, an exported model's
config) is written by `atomic_write`: into a temporary file beside its final name, flushed,
then renamed into place, so a crash or a full disk never leaves half a file under the real
name. The file gets the permissions the user's umask gives a new file (0644 under the usual
umask 022), as `open()` would; mkstemp alone would make it private (0600).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffusekit.errors import UserError

TEMP_PREFIX = ".tmp-"  # folders being written, renamed into place when complete


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (/proc), else by setting and restoring it."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode(folder: bool = False) -> int:
    """The mode open() / mkdir() would give a new file or folder: 0666 / 0777 less the umask."""
    return (0o777 if folder else 0o666) & ~current_umask()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: Path, files: bool = True) -> None:
    """Flush a folder's files (optional) and its entries to disk, so that a power cut after a rename
    cannot leave the new name pointing at empty files."""
    for path in [p for p in folder.iterdir() if p.is_file()] if files else []:
        fsync_path(path)
    with contextlib.suppress(OSError):  # some file systems cannot sync a folder
        fsync_path(folder)


def atomic_write(path: str | Path, write: Callable[[Path], object], sync: bool = True) -> Path:
    """Call write(temporary_path) to fill a temporary file beside `path`, then rename it to `path`.

    The parent folder is created. With `sync` the data reaches the disk before the rename.
    On any failure (a full disk included) the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, new_file_mode())  # after writing: some writers (safetensors) replace the file with a private one
        if sync:
            fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None, sync: bool = True) -> Path:
    """A safetensors file (tensors moved to the CPU, made contiguous), written atomically."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata), sync=sync)


def make_temp_folder(final: Path) -> Path:
    """A temporary folder beside `final`, to be renamed into place; with the mode mkdir would give
    (mkdtemp alone makes it private)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{final.name}-", dir=final.parent))
    os.chmod(tmp, new_file_mode(folder=True))
    return tmp


# ----------------------------------------------------------------------------- reading


def read_json(path: Path, what: str, container: str = "the checkpoint") -> dict:
    """A JSON object from a file; a missing, unreadable or non-object file is a UserError naming `what` and `container`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
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


def read_cached_tensors(path: str | Path) -> dict[str, torch.Tensor] | None:
    """A cache file's tensors, or None when it is missing or damaged (a cache is rebuilt, never trusted blindly)."""
    try:
        return load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError):
        return None


def cache_dir() -> Path:
    """Where derived data is cached (renderings, reference features, latents): $DIFFUSEKIT_CACHE or ~/.cache/diffusekit."""
    return Path(os.environ.get("DIFFUSEKIT_CACHE", Path.home() / ".cache" / "diffusekit"))
