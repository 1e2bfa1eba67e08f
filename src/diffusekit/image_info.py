"""What an image remembers of how it was made: the parameters text of each image a Pipeline makes
(AUTOMATIC1111's "parameters" layout, images.format_parameters), the model's fingerprint, and the
output object Pipeline(...) returns.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from diffusekit.conditioning import class_labels
from diffusekit.images import format_parameters
from diffusekit.inpaint import default_strength
from diffusekit.nn.state import canonical_tensors
from diffusekit.version import __version__


@torch.no_grad()
def fingerprint(*modules) -> str:
    """A short hash (10 hex digits) of the weights of `modules` (None skipped) in their canonical float32 form
    (nn/state.canonical_tensors): the same weights give the same hash in any folder, format or memory layout."""
    digest = hashlib.sha256()
    for module in modules:
        for key, tensor in canonical_tensors(module):
            digest.update(key.encode())
            digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:10]


def with_fused_loras(model_hash: str, fused: list[str]) -> str:
    """The Model hash of a model with LoRAs folded into its weights: the stored model's hash joined with each fused
    LoRA's digest (nn/lora.fused_digests: its float32 tensors, layer and factor), so it follows the fused weights and
    is the same at every precision. Without fused LoRAs it is the stored model's hash."""
    if not fused:
        return model_hash
    return hashlib.sha256(";".join([model_hash, *sorted(fused)]).encode()).hexdigest()[:10]


def describe(pipe, n: int, prompts=None, negative: str | None = None, labels=None, first_index: int = 0, size: int | None = None,
             strength: float | None = None, mask_blur: float | None = None, edit: bool = False, masked: bool = False,
             jump_length: int = 10, jump_n_sample: int = 1, noise=None, **given) -> list[str]:
    """The "parameters" text (AUTOMATIC1111's layout, images.format_parameters) of each of the n images that
    pipe.sample() makes with these arguments (the others of sample()'s are ignored): its prompt, seed and index,
    settings, model and its fingerprint. With given noise there is no seed that makes the image again."""
    settings = pipe.settings(n=n, **{k: given.get(k) for k in ("steps", "sampler", "spacing", "seed", "guidance", "guidance_rescale", "eta")})
    prompts = [prompts] if isinstance(prompts, str) else list(prompts or [""])
    labels = class_labels(labels, n, pipe.config.model.num_classes).tolist() if labels is not None else None
    options = pipe.sampler_options(settings, given.get("eta"), given.get("variance"))  # what the sampler really ran with
    guided = prompts != [""] or labels is not None
    loras = lora_text(pipe)
    controls = pipe.control_fields(given.get("control_image"), given)  # "ControlNet 0": AUTOMATIC1111's ControlNet extension's field
    texts = []
    for i in range(n):
        fields = {"Steps": settings.steps, "Sampler": settings.sampler, "Schedule type": settings.spacing,
                  "CFG scale": settings.guidance if guided else 1.0, "Seed": settings.seed if noise is None else None,
                  "Image index": first_index + i if noise is None else None,
                  "Size": f"{size or pipe.config.data.image_size}x{size or pipe.config.data.image_size}",
                  "Model hash": pipe.fingerprint, "Model": pipe.name, "LoRA": loras, "Label": labels[i] if labels else None, "Batch size": n if n > 1 else None,
                  "Denoising strength": default_strength(strength, masked) if edit else None,
                  "Mask blur": mask_blur if masked else None, "Eta": options.get("eta"), "Variance": options.get("variance"),
                  "Jump length": jump_length if jump_n_sample > 1 else None, "Jump samples": jump_n_sample if jump_n_sample > 1 else None,
                  "Guidance rescale": settings.guidance_rescale or None, **controls, "Precision": pipe.precision, "Version": f"diffusekit {__version__}"}
        texts.append(format_parameters(prompts[i % len(prompts)], negative or "", fields))
    return texts


def lora_text(pipe) -> str | None:
    """The LoRAs an image was made with, as --lora takes them after the file: "style:0.8, face:0.5"."""
    return ", ".join(f"{name}:{scale:g}" for name, scale in pipe.lora_scales.items()) or None


class ImageOutput(list):
    """What Pipeline(...) returns: the list of PIL images itself (iterate, index, len), with diffusers' `.images`
    and `.parameters`, each image's parameters text (also in image.info["parameters"]; images.png_bytes and the
    CLI write it into the PNG)."""

    def __init__(self, images, parameters: list[str], attention=None):
        super().__init__(images)
        self.parameters = parameters
        self.attention = attention  # with return_attention=True: the prompt's cross-attention maps (attention_maps.AttentionMaps)

    @property
    def images(self) -> list:
        return list(self)


def model_name(source: Path | None) -> str:
    """What images call a model: its run folder's name (runs/NAME/checkpoints/step_N -> NAME), else its folder's."""
    if source is None:
        return "model"
    source = Path(source)
    return source.parent.parent.name if source.parent.name == "checkpoints" else source.name
