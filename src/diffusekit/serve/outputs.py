"""The outputs folder of `diffusekit serve`: write each image into it, scan it on start, move images to its trash.

    outputs/2026-12-04/153012-5-0-0123456789abcdef.png   time, seed, image index, id: a PNG with its parameters
    outputs/trash/2026-12-04/...png                        deleted from the gallery (never shown, never outside outputs/)

An image's id is the 16 hex digits at the end of its file name, so an /api/images/ID.png URL works after a restart;
a PNG named otherwise (copied in by hand) gets the first 16 hex digits of the SHA-256 of its path inside the folder.
The scan reads names and modification times only (fast for many thousands of files); an image's parameters are
read from its PNG text chunk when it is shown (read_parameters: the header, never the pixels).

A folder that cannot be written (a file, read-only, a full disk) is one warning and a `problem` the page shows;
the images then stay in memory. Writing is tried again with each image, and a success clears the problem.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from diffusekit.errors import warn
from diffusekit.files import atomic_write
from diffusekit.images import PARAMETERS_KEY

TRASH = "trash"
NAMED_ID = re.compile(r"(?:.*-)?([0-9a-f]{16})\.png")  # the id at the end of a name the server wrote (fullmatch)
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last 12 bytes of every complete PNG


@dataclass(frozen=True)
class Found:
    """A PNG the scan found: its id, path and modification time (ns)."""

    id: str
    path: Path
    mtime_ns: int


def path_id(relative: str) -> str:
    return hashlib.sha256(relative.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def read_parameters(path: Path) -> str | None:
    """The "parameters" text of a complete PNG (its header and text chunks only, no pixels decoded); None for a file
    that is damaged (not a PNG, cut short) or carries no parameters."""
    try:
        with open(path, "rb") as file:
            file.seek(-len(PNG_END), os.SEEK_END)
            if file.read() != PNG_END:  # cut short: a copy or a write that never finished
                return None
            file.seek(0)
            with Image.open(file, formats=["PNG"]) as image:
                text = image.info.get(PARAMETERS_KEY)
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError):
        return None
    return text if isinstance(text, str) else None


class Outputs:
    """One outputs folder: `write` an image, `scan` what is there, move an image to `trash`; `problem` says why images
    are not being saved (None while they are)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.lock = threading.Lock()
        self.last_ns = 0
        self.problem = self.check()
        if self.problem:
            warn(self.problem)

    def check(self) -> str | None:
        """Why images could not be written into the folder (it is a file, or not writable), or None. A missing folder
        is made with the first image, if its nearest existing parent is a writable folder."""
        existing = self.root
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if existing == self.root and not self.root.is_dir():
            return self.explain(f"'{self.root}' is a file, not a folder")
        if not existing.is_dir():
            return self.explain(f"'{existing}' is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            return self.explain(f"'{existing}' is not writable")
        return None

    def explain(self, cause: str, fix: str = "choose a writable folder with --outputs DIR, or --no-save") -> str:
        return f"cannot save images into the outputs folder {self.root}: {cause}; new images are kept in memory only (the newest); {fix}"

    def path_for(self, image) -> Path:
        local = time.localtime(image.created)
        return self.root / time.strftime("%Y-%m-%d", local) / f"{time.strftime('%H%M%S', local)}-{image.seed}-{image.index}-{image.id}.png"

    def write(self, image) -> Path | None:
        """Write the image's PNG (atomically, its modification time its creation time) into today's subfolder; its path,
        or None when it could not be written (the first failure in a row warns once)."""
        path = self.path_for(image)
        with self.lock:  # strictly increasing times: a restart lists a batch in the order it was made
            stamp = self.last_ns = max(int(image.created * 1e9), self.last_ns + 1)

        def fill(tmp: Path) -> None:
            tmp.write_bytes(image.png)
            os.utime(tmp, ns=(stamp, stamp))

        try:
            atomic_write(path, fill, sync=False)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                problem = self.explain("the disk is full", "free some space (saving starts again by itself) or choose --outputs DIR")
            elif isinstance(err, (FileExistsError, NotADirectoryError)):
                problem = self.explain(f"'{self.root}' or a folder above it is a file")
            else:
                problem = self.explain(err.strerror or str(err))
            with self.lock:  # the first failure in a row is the one warned about and shown
                first = self.problem is None
                self.problem = self.problem or problem
            if first:
                warn(problem)
            return None
        self.problem = None
        return path

    def scan(self) -> list[Found]:
        """The PNGs in the folder and in its subfolders one level down (not trash/, hidden or linked ones), newest first
        by modification time; ids unique (a second file with an id already seen gets its path's)."""
        candidates: list[tuple[int, str, Path]] = []
        try:
            with os.scandir(self.root) as top:
                for entry in top:
                    if entry.name.startswith(".") or entry.is_symlink():
                        continue
                    if entry.is_dir() and entry.name != TRASH:
                        candidates += self._pngs(Path(entry.path))
                    elif entry.is_file() and entry.name.lower().endswith(".png"):
                        candidates.append((entry.stat().st_mtime_ns, entry.name, Path(entry.path)))
        except OSError:  # missing, a file, unreadable: nothing to show (check() has said why it cannot be written)
            return []
        found, seen = [], set()
        for mtime_ns, _, path in sorted(candidates, reverse=True):
            relative = path.relative_to(self.root).as_posix()
            named = NAMED_ID.fullmatch(path.name)
            image_id = named[1] if named and named[1] not in seen else path_id(relative)
            if image_id not in seen:
                seen.add(image_id)
                found.append(Found(image_id, path, mtime_ns))
        return found

    @staticmethod
    def _pngs(folder: Path) -> list[tuple[int, str, Path]]:
        out = []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if not entry.name.startswith(".") and entry.name.lower().endswith(".png") and entry.is_file(follow_symlinks=False):
                        out.append((entry.stat().st_mtime_ns, entry.name, Path(entry.path)))
        except OSError:
            pass
        return out

    def trash(self, path: Path) -> Path | None:
        """Move an image of the folder into trash/ (its subfolder kept; a name taken gets -1, -2, ...): the new path,
        or None when the file was already gone. OSError when it cannot be moved (a read-only folder)."""
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise ValueError(f"{path} is not inside the outputs folder {self.root}")
        target = self.root / TRASH / path.relative_to(self.root)
        k = 0
        while target.exists():
            k += 1
            target = target.with_name(f"{path.stem}-{k}{path.suffix}")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return None
        return target
