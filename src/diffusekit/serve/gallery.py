"""The gallery: every image the server made, newest first and paged; those in the outputs folder (outputs.py) and
those kept in memory only (with --no-save, or while the folder cannot be written: the newest `capacity` of them).

On start the outputs folder is scanned (names and times only) and each image is indexed unread; its parameters are
read from its PNG when a page shows it, and a background thread reads the rest, counts the PNGs that are damaged or
carry no parameters, drops them, and says so once ("gallery: N images, M skipped ..."). An image in the folder is
never held in memory: its PNG is read from disk when asked for.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from diffusekit.errors import warn
from diffusekit.images import parse_parameters
from diffusekit.serve.outputs import Outputs, read_parameters

LOG = logging.getLogger("uvicorn.error")  # uvicorn's own log: its format and --log-level


@dataclass
class GalleryImage:
    """One image: its PNG bytes while in memory, its path once in the outputs folder. An image found there on start
    has parameters None until it is read (Gallery.get loads it)."""

    id: str
    job: str | None
    model: str | None
    png: bytes | None
    parameters: str | None
    seed: int | None
    index: int | None
    created: float = field(default_factory=time.time)
    path: Path | None = None

    def summary(self) -> dict:
        return {"id": self.id, "job": self.job, "model": self.model, "url": f"/api/images/{self.id}.png", "parameters": self.parameters,
                "seed": self.seed, "index": self.index, "created": self.created}


def from_parameters(image: GalleryImage, text: str) -> GalleryImage:
    """A scanned image with what its parameters text says: model, seed and image index (A1111's images have no index: 0)."""
    fields = parse_parameters(text)
    seed, index, model = fields.get("Seed"), fields.get("Image index", 0), fields.get("Model")
    return replace(image, parameters=text, model=str(model) if model is not None else None,
                   seed=seed if isinstance(seed, int) else None, index=index if isinstance(index, int) else 0)


class Gallery:
    """The index of images (oldest first in `order`); with `folder`, every new image is written there too."""

    def __init__(self, capacity: int = 256, folder: str | Path | None = None):
        self.capacity = capacity
        self.outputs = Outputs(folder) if folder is not None else None
        self.images: dict[str, GalleryImage] = {}
        self.order: list[str] = []
        self.in_memory: collections.deque[str] = collections.deque()  # ids of images not in the folder, oldest first
        self.lock = threading.Lock()
        self.skipped: list[Path] = []
        self.checked = threading.Event()
        if self.outputs is None:
            self.checked.set()
            return
        for found in reversed(self.outputs.scan()):
            self.images[found.id] = GalleryImage(found.id, None, None, None, None, None, None, found.mtime_ns / 1e9, found.path)
            self.order.append(found.id)
        threading.Thread(target=self._check_all, name="diffusekit-gallery", daemon=True).start()

    def add(self, image: GalleryImage) -> None:
        """Index a new image; written into the outputs folder when there is one (then only its path is kept here)."""
        path = self.outputs.write(image) if self.outputs is not None else None
        kept = replace(image, png=None, path=path) if path is not None else image
        with self.lock:
            self.images[image.id] = kept
            self.order.append(image.id)
            if path is None:
                self.in_memory.append(image.id)
                while len(self.in_memory) > self.capacity:
                    self._drop(self.in_memory.popleft())

    def _drop(self, image_id: str) -> bool:
        """Forget an image (the lock held); False when it was not indexed."""
        if self.images.pop(image_id, None) is None:
            return False
        self.order.remove(image_id)
        return True

    def get(self, image_id: str) -> GalleryImage | None:
        """The image with its parameters (read from its PNG the first time); None if unknown, damaged or without parameters."""
        with self.lock:
            image = self.images.get(image_id)
        if image is None or image.parameters is not None:
            return image
        text = read_parameters(image.path)
        with self.lock:
            if self.images.get(image_id) is not image:  # deleted, or read by another thread meanwhile
                return self.images.get(image_id)
            if text is None:
                self._drop(image_id)
                self.skipped.append(image.path)
                return None
            image = self.images[image_id] = from_parameters(image, text)
        return image

    def page(self, offset: int, limit: int) -> tuple[list[GalleryImage], int]:
        """Up to `limit` images, newest first, from the `offset`-th; and how many there are in all."""
        with self.lock:
            newest_first = self.order[::-1]
        out = []
        for image_id in newest_first[offset:]:
            if len(out) == limit:
                break
            image = self.get(image_id)
            if image is not None:
                out.append(image)
        with self.lock:
            return out, len(self.order)

    def png(self, image: GalleryImage) -> bytes | None:
        """Its PNG: from memory, or read from the outputs folder (None, and forgotten, if the file is gone)."""
        if image.png is not None:
            return image.png
        try:
            return image.path.read_bytes()
        except OSError:
            with self.lock:
                self._drop(image.id)
            return None

    def delete(self, image_id: str) -> Path | None:
        """Remove an image from the gallery; one in the outputs folder is moved to its trash/ (the path there is returned).
        KeyError if unknown; OSError (the image stays) when the folder does not let it move."""
        with self.lock:
            image = self.images[image_id]
        trashed = self.outputs.trash(image.path) if image.path is not None and self.outputs is not None else None
        with self.lock:
            if self._drop(image_id) and image_id in self.in_memory:
                self.in_memory.remove(image_id)
        return trashed

    def status(self) -> dict:
        """Where images go and, when they cannot be saved there, why (the page shows it as a notice)."""
        outputs = self.outputs
        with self.lock:
            total = len(self.order)
        return {"outputs": str(outputs.root) if outputs else None, "saving": bool(outputs and outputs.problem is None),
                "notice": outputs.problem if outputs else None, "images": total, "checked": self.checked.is_set(), "skipped": len(self.skipped)}

    def _check_all(self) -> None:
        """Read every scanned image's parameters (newest first, as pages ask), then say how many were skipped."""
        with self.lock:
            newest_first = self.order[::-1]
        for image_id in newest_first:
            self.get(image_id)
        with self.lock:
            total, skipped = len(self.order), list(self.skipped)
        self.checked.set()
        line = f"gallery: {total} images, {len(skipped)} skipped (damaged or without parameters)"
        if skipped:
            shown = ", ".join(str(path) for path in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
            warn(f"{line}: {shown}; they stay in {self.outputs.root} but are not shown")
        else:
            LOG.info(f"{line} in {self.outputs.root}")
