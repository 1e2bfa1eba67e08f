"""diffusekit: readable diffusion models that train and sample fast on a CPU.

    from diffusekit import Pipeline
    images = Pipeline.from_pretrained("runs/mnist")(n=16)

The package imports nothing heavy until a name is used (so `diffusekit --help` stays fast).
"""

from __future__ import annotations

from diffusekit.version import __version__

__all__ = ["Pipeline", "__version__"]


def __getattr__(name: str):
    if name == "Pipeline":
        from diffusekit.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'diffusekit' has no attribute {name!r}")
