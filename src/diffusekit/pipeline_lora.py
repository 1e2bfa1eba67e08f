"""The Pipeline's LoRA methods (nn/lora.py, io/lora.py): load, scale, fuse, unfuse, unload.

    name = pipe.load_lora("style.safetensors", scale=0.8)  # diffusers / peft or kohya / A1111 layout
    pipe.set_lora_scales({name: 0.5}); pipe.unload_lora()  # the base model's weights are never changed

A mixin of pipeline.Pipeline: it works on the pipeline's U-Net (`self.net`) and text encoder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffusekit.errors import warn
from diffusekit.io.lora import load_lora, recorded_base, text_model
from diffusekit.nn import lora


class LoRAMethods:
    def lora_networks(self) -> list[torch.nn.Module]:
        return [self.net] + ([text_model(self.text_encoder)] if self.text_encoder is not None else [])

    def load_lora(self, path: str | Path, scale: float = 1.0, name: str | None = None) -> str:
        """Add the LoRA file `path` (diffusers / peft or kohya / A1111 layout; a `diffusekit finetune` run folder
        means its lora.safetensors) to the U-Net and the text encoder at `scale`; returns its name (by default
        the file's stem). The base weights are not changed; a file that does not fit changes nothing."""
        name = load_lora(path, self.net, name=name, scale=scale, text_encoder=self.text_encoder)
        self._weights_changed()
        recorded, base = recorded_base(path)
        own = self.stored_fingerprints["unet"] if recorded else recorded  # the stored weights', whatever their dtype or fused LoRAs
        if own != recorded:
            warn(f"{path} was fine-tuned from another base model ({base or 'unnamed'}, U-Net fingerprint {recorded[:12]}; this one's is "
                 f"{own[:12]}): its layers fit, but it may not draw what it learnt")
        return name

    @property
    def lora_names(self) -> list[str]:
        return sorted({n for net in self.lora_networks() for n in lora.adapter_names(net)})

    @property
    def lora_scales(self) -> dict[str, float]:
        """{name: scale} of the loaded LoRAs (fused or not), as images record them."""
        return {n: next(iter(lora.lora_modules(net, n).values())).scale for net in self.lora_networks() for n in lora.adapter_names(net)}

    def set_lora_scales(self, scales: dict[str, float]) -> None:
        """Each loaded LoRA's scale by name, e.g. {"style": 0.8, "face": 0.5}; 0 switches one off."""
        for key in scales:  # every name is loaded, before any change
            self._check_loaded(key)
        for net in self.lora_networks():
            lora.set_scales(net, {k: v for k, v in scales.items() if k in lora.adapter_names(net)})

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA (or all): the networks are as they were before loading it."""
        self._each_network(name, lambda net: lora.remove_lora(net, name))

    def fuse_lora(self, name: str | None = None, keep_original: bool = True) -> None:
        """Fold LoRAs into the weights in memory (faster sampling); unfuse_lora() or unload_lora() takes them out
        again, exactly (keep_original: a copy of each adapted weight is kept meanwhile) or up to float32 rounding."""
        self.stored_fingerprints  # of the weights before the fuse changes them
        self._each_network(name, lambda net: lora.merge(net, name, keep_original))

    def unfuse_lora(self, name: str | None = None) -> None:
        self._each_network(name, lambda net: lora.unmerge(net, name))

    def _check_loaded(self, name: str | None) -> None:
        if name is not None and name not in self.lora_names:
            lora.lora_modules(self.net, name)  # the UserError naming the loaded ones

    def _each_network(self, name: str | None, action) -> None:
        """action(net) for the U-Net and the text encoder, where they carry the LoRA `name` (None: any)."""
        self._check_loaded(name)
        for net in self.lora_networks():
            if name is None or name in lora.adapter_names(net):
                action(net)
        self._weights_changed()

    def _weights_changed(self) -> None:
        """Forget the cached Pipeline.fingerprint: it hashes the weights (LoRAs included) as they are now."""
        self.__dict__.pop("fingerprint", None)
