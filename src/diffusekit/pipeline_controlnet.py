"""The Pipeline's ControlNet methods (nn/controlnet.py, io/controlnet.py, control.py): load, add, unload, and a call's
control images, scales and step fractions checked into control.Control's.

    name = pipe.load_controlnet("control_v11p_sd15_canny/")           # a diffusers ControlNet folder
    images = pipe("a house", control_image=edges, controlnet_conditioning_scale=0.8, control_guidance_end=0.6)

A mixin of pipeline.Pipeline: it works on the pipeline's U-Net (`self.net`), device and dtype. ControlNets are used in
the order they were loaded; control_image and the three settings are one value for all or a list, one per ControlNet.
control_image may also be a dict {name: image}: only those ControlNets steer (the studio's jobs). control_module names the
annotator that made each control image (default "none"), which the images record as the ControlNet line's Module.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusekit.control import Control
from diffusekit.errors import UserError, warn
from diffusekit.image_info import fingerprint
from diffusekit.images import image_tensor
from diffusekit.io.controlnet import controlnet_folder, read_controlnet
from diffusekit.io.controlnet_file import is_controlnet_file, read_controlnet_file
from diffusekit.nn.controlnet import ControlNet, check_fits

SETTINGS = (("controlnet_conditioning_scale", 1.0), ("control_guidance_start", 0.0), ("control_guidance_end", 1.0))


class ControlNetMethods:
    def load_controlnet(self, path: str | Path, name: str | None = None) -> str:
        """Add the diffusers ControlNet folder `path` (config.json + diffusion_pytorch_model.safetensors, or a folder with
        controlnet/ in it) or an original-layout ControlNet file (.safetensors, .pth: io/controlnet_file.py); returns its name
        (by default the folder's or file's). One made for another base model is refused."""
        if is_controlnet_file(path):
            return self.add_controlnet(read_controlnet_file(path), name or Path(path).stem)
        folder = controlnet_folder(path)
        name = name or (folder.parent.name if folder.name == "controlnet" else folder.name)
        return self.add_controlnet(read_controlnet(folder), name)

    def load_controlnets(self, model: str | Path, folders=None):
        """from_pretrained's controlnet=: a folder or a list of them; by default a ControlNet pipeline folder's controlnet/."""
        model = Path(model)
        if folders is None and (model / "model_index.json").is_file() and (model / "controlnet" / "config.json").is_file():
            folders = model / "controlnet"
        for folder in [] if folders is None else folders if isinstance(folders, (list, tuple)) else [folders]:
            self.load_controlnet(folder)
        return self

    def add_controlnet(self, net: ControlNet, name: str) -> str:
        """Add a ControlNet in memory (ControlNet.from_unet(pipe.net, ...), a trained one) under `name`."""
        check_fits(net, self.net, name)
        hash_ = fingerprint(net)  # of the weights as stored, before a cast to the pipeline's precision
        if name in self.controlnets and self.controlnets[name][1] == hash_:
            return name  # loaded already (a ControlNet pipeline folder's own, named again)
        if name in self.controlnets:
            raise UserError(f"another ControlNet named '{name}' is loaded already; give another name or unload it first")
        self.controlnets[name] = (net.eval().to(self.device, self.dtype), hash_)
        return name

    def unload_controlnet(self, name: str | None = None) -> None:
        """Remove one ControlNet (or all)."""
        if name is not None and name not in self.controlnets:
            raise UserError(f"no ControlNet named '{name}' is loaded; loaded: {', '.join(self.controlnets) or 'none'}")
        for key in [name] if name is not None else list(self.controlnets):
            del self.controlnets[key]

    def control_settings(self, images, given: dict) -> list[dict]:
        """Per loaded ControlNet: its image and settings, checked (one UserError naming the value and the fix)."""
        if images is None:
            return []
        if not self.controlnets:
            raise UserError("a control image needs a ControlNet, and none is loaded: give --controlnet RUN_OR_FOLDER "
                            "(Python: pipe.load_controlnet(folder))")
        if isinstance(images, dict):  # {name: image}: only these ControlNets steer, in this order
            unknown = [name for name in images if name not in self.controlnets]
            if unknown:
                raise UserError(f"no ControlNet named '{unknown[0]}' is loaded; loaded: {', '.join(self.controlnets)}")
            out = [{"name": name, "image": image} for name, image in images.items()]
        else:
            images = list(images) if isinstance(images, (list, tuple)) else [images]
            if len(images) != len(self.controlnets):
                raise UserError(f"{len(images)} control image(s) for {len(self.controlnets)} ControlNet(s) ({', '.join(self.controlnets)}); "
                                "give one per ControlNet")
            out = [{"name": name, "image": image} for name, image in zip(self.controlnets, images)]
        count = len(out)
        for key, default in SETTINGS:
            value = given.get(key, default)
            values = list(value) if isinstance(value, (list, tuple)) else [value] * count
            if len(values) != count:
                raise UserError(f"{key} has {len(values)} values for {count} ControlNet(s); give one value, or one per ControlNet")
            for entry, v in zip(out, values):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise UserError(f"{key} = {v!r} is not a number; give a number such as {default} (--control IMAGE:SCALE takes the scale)")
                entry[key] = float(v)
        modules = given.get("control_module", "none")  # the annotator that made each control image: the PNG's Module
        modules = list(modules) if isinstance(modules, (list, tuple)) else [modules] * count
        if len(modules) != count or not all(isinstance(m, str) for m in modules):
            raise UserError(f"control_module = {given.get('control_module')!r}: give one annotator name (e.g. 'canny'), or one per ControlNet")
        for entry, module in zip(out, modules):
            entry["control_module"] = module
        for entry in out:
            start, end = entry["control_guidance_start"], entry["control_guidance_end"]
            if not 0 <= start < end <= 1:
                raise UserError(f"control_guidance_start = {start:g} and control_guidance_end = {end:g} (--control-start, --control-end): the "
                                "ControlNet acts from start to end, fractions of the steps with 0 <= start < end <= 1")
        return out

    def control_inputs(self, images, given: dict, n: int, shape) -> tuple[Control, ...]:
        """The Controls of one sample() call: each control image as [1 or n, C, H, W] in [0, 1] at the ControlNet's input size."""
        entries = self.control_settings(images, given)
        if entries and not hasattr(self.denoiser, "network_inputs"):
            raise UserError("ControlNets steer a model's plain denoiser; a consistency student's sampling takes none: use its teacher")
        controls = []
        for entry in entries:
            name, (net, _) = entry["name"], self.controlnets[entry["name"]]
            size = shape[-1] * net.downsample_factor
            image = control_tensor(entry["image"], name, n, size, net.shape.conditioning_channels)
            controls.append(Control(net, ((image + 1) / 2).clamp(0, 1).to(self.device), entry["controlnet_conditioning_scale"],
                                    entry["control_guidance_start"], entry["control_guidance_end"]))
        return tuple(controls)

    def control_fields(self, images, given: dict) -> dict:
        """What images record of their ControlNets, as AUTOMATIC1111's ControlNet extension writes it:
        ControlNet 0: "Module: none, Model: NAME [HASH], Weight: 1, Guidance Start: 0, Guidance End: 1"."""
        entries = self.control_settings(images, given)
        return {f"ControlNet {i}": f"Module: {e['control_module']}, Model: {e['name']} [{self.controlnets[e['name']][1]}], "
                                   f"Weight: {e['controlnet_conditioning_scale']:g}, Guidance Start: {e['control_guidance_start']:g}, "
                                   f"Guidance End: {e['control_guidance_end']:g}"
                for i, e in enumerate(entries)}


def control_tensor(image, name: str, n: int, size: int, channels: int) -> torch.Tensor:
    """A control image (PIL, or a tensor [1 or n, C, H, W] in [-1, 1]) as a tensor at `size`: another size is resized, with a note."""
    if not isinstance(image, torch.Tensor):
        if not hasattr(image, "size") or not hasattr(image, "convert"):
            raise UserError(f"the control image for ControlNet '{name}' is a {type(image).__name__}; give a picture (PIL image or file) "
                            f"or a tensor [1 or {n}, {channels}, H, W] in [-1, 1]")
        if image.size != (size, size):
            warn(f"the control image for ControlNet '{name}' is {image.width}x{image.height} pixels; it is cropped to its centre square and "
                 f"resized to {size}x{size}, the output size")
        return image_tensor(image, size, channels)
    if image.ndim != 4 or image.shape[0] not in (1, n) or image.shape[1] != channels:
        raise UserError(f"the control image for ControlNet '{name}' is {list(image.shape)}; it must be [1 or {n}, {channels}, H, W] in [-1, 1]")
    if tuple(image.shape[-2:]) != (size, size):
        warn(f"the control image for ControlNet '{name}' is {image.shape[-1]}x{image.shape[-2]}; it is resized to {size}x{size}, the output size")
        image = F.interpolate(image.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return image.float()


def check_control_names(control: dict) -> dict:
    """Pipeline.sample()'s control settings: diffusers' names, nothing else."""
    unknown = sorted(set(control) - {name for name, _ in SETTINGS} - {"control_module"})
    if unknown:
        raise TypeError(f"Pipeline.sample() got unexpected keyword argument(s) {', '.join(unknown)}")
    return control
