"""Control images made from images, for training and using ControlNets: Canny edges (OpenCV) and scribbles.

    edges = annotate(images, "canny")              # uint8 [N, C, H, W] -> uint8 [N, 3, H, W]: white edges on black
    scribbles = annotate(images, "scribble", seed=0)

A scribble is a Canny edge map thickened (dilated to about 3 px) and bent by a smooth random displacement of a couple
of pixels, so that it looks drawn by hand rather than traced; the same seed gives the same scribbles.
OpenCV comes from the `opencv-python-headless` package (`pip install diffusekit[control]`).
"""

from __future__ import annotations

import numpy as np
import torch

from diffusekit.errors import UserError

ANNOTATORS = ("canny", "scribble")
CANNY_THRESHOLDS = (100, 200)  # OpenCV's hysteresis thresholds: the usual ones of Canny ControlNets
JITTER_PIXELS = 1.5  # how far a scribble's stroke strays from the edge
JITTER_SMOOTHNESS = 4.0  # the displacement field's Gaussian blur (pixels): larger bends the strokes more smoothly


def opencv():
    try:
        import cv2
    except ImportError:
        raise UserError("the canny and scribble annotators need OpenCV: pip install opencv-python-headless "
                        "(or pip install 'diffusekit[control]'), or give a folder of control images") from None
    return cv2


def canny_edges(image: np.ndarray) -> np.ndarray:
    """[H, W] uint8 edges (255 on an edge) of an [H, W] gray or [H, W, 3] RGB uint8 image."""
    cv2 = opencv()
    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return cv2.Canny(gray, *CANNY_THRESHOLDS)


def scribble_lines(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[H, W] uint8: the image's Canny edges thickened and jittered by a smooth random displacement."""
    cv2 = opencv()
    edges = cv2.dilate(canny_edges(image), np.ones((3, 3), np.uint8))
    h, w = edges.shape
    field = [cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), JITTER_SMOOTHNESS) for _ in range(2)]
    field = [f * (JITTER_PIXELS / max(float(np.abs(f).max()), 1e-6)) for f in field]  # at most JITTER_PIXELS away
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    bent = cv2.remap(edges, xs + field[0], ys + field[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return np.where(bent > 127, 255, 0).astype(np.uint8)


def annotate(images: torch.Tensor, how: str, seed: int = 0) -> torch.Tensor:
    """Control images of `images` (uint8 [N, C, H, W]) as uint8 [N, 3, H, W], white lines on black; image i's scribble
    depends only on (seed, i)."""
    if how not in ANNOTATORS:
        raise UserError(f"unknown annotator '{how}'; use one of {', '.join(ANNOTATORS)}, or a folder of control images")
    out = []
    for i, tensor in enumerate(images):
        array = tensor.permute(1, 2, 0).numpy()
        array = array[..., 0] if array.shape[-1] == 1 else np.ascontiguousarray(array[..., :3])
        lines = canny_edges(array) if how == "canny" else scribble_lines(array, np.random.default_rng([seed, i]))
        out.append(torch.from_numpy(lines)[None].expand(3, -1, -1))
    return torch.stack(out).contiguous() if out else torch.zeros(0, 3, *images.shape[-2:], dtype=torch.uint8)
