"""ControlNet training (`diffusekit train-controlnet`): a ControlNet learns to steer a frozen text-to-image model.

    config = controlnet_config("runs/emoji-ldm", "my_images/", "canny", ['train.budget="20m"'])
    result = train_controlnet(config, "runs/edges")   # then Pipeline.from_pretrained(BASE, controlnet="runs/edges")

The base model (a diffusekit run or checkpoint, a diffusers folder, or the shipped demo model) is loaded and
frozen. Its ControlNet starts as a copy of the U-Net's encoder with zero convolutions (ControlNet.from_unet), so
step 0 is the base model. The same diffusion loss as `train` (diffusion_training.diffusion_step) trains the
ControlNet alone: the condition carries each image's control image (ControlBatches), and the step runs the U-Net
with the ControlNet's residuals (nn/controlnet.ControlledUNet). The optimizer, the EMA and every checkpoint hold the
ControlNet and nothing of the base, and a resume continues bit for bit as in `train`.

The control images come from the training images through an annotator (annotators.py: canny, scribble), or from a
folder of control images with the training images' file names. RUN/samples/step_N.png shows a row of fixed
control images over the images drawn from them. RUN/controlnet/ (the EMA ControlNet as a diffusers ControlNetModel
folder) is rewritten with every checkpoint: `--controlnet RUN` loads it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch

from diffusekit.annotators import ANNOTATORS, annotate
from diffusekit.config import Config, ControlNetConfig, EvalConfig, TrainConfig, apply_overrides
from diffusekit.data import ImageDataset, to_float
from diffusekit.data.folder import describe_captions, load_folder, read_captions
from diffusekit.data.latents import latent_dataset
from diffusekit.devices import prepare_module
from diffusekit.diffusion_batches import DiffusionBatches
from diffusekit.diffusion_training import diffusion_step
from diffusekit.errors import UserError
from diffusekit.files import write_json_atomic
from diffusekit.finetune import DEMO, base_config, base_path, check_base
from diffusekit.images import save_grid
from diffusekit.io.controlnet import write_controlnet
from diffusekit.nn.controlnet import ControlledUNet, ControlNet, embedding_channels_for
from diffusekit.nn.state import weights_fingerprint
from diffusekit.pipeline import load_model
from diffusekit.schedule import make_schedule
from diffusekit.trainer import Recipe, Trained, TrainResult, run_training
from diffusekit.training_state import save_output

RUN_FOLDER = "controlnet"  # RUN/controlnet/: the EMA ControlNet in diffusers' layout
# training defaults of a ControlNet run (the base's own train.* are for training from scratch)
CONTROLNET_TRAIN = dict(batch_size=16, lr=1e-4, warmup_steps=10, ema_decay=0.99, max_steps=2000, log_every=10, checkpoint_every=100)


def controlnet_config(base: str | Path | None, data: str | Path, control: str = "canny", overrides=(), values: dict | None = None) -> Config:
    """A ControlNet run's config: the base model's networks, diffusion and sampling settings, the captioned image folder
    `data`, the control (an annotator or a folder), the training defaults above, then the --set overrides and the flags."""
    config = base_config(base)
    if config.model.type != "unet" or not config.model.cross_attention_dim:
        raise UserError(f"'{base_path(base)}' is not a text-to-image U-Net; a ControlNet copies such a U-Net's encoder "
                        "(give a text-to-image model as BASE)")
    if control not in ANNOTATORS and not Path(control).is_dir():
        raise UserError(f"--control {control!r} is neither an annotator ({', '.join(ANNOTATORS)}) nor a folder of control images")
    config = replace(
        config, task="controlnet", description=f"ControlNet for {base or DEMO} on {data} ({control})",
        data=replace(config.data, dataset="folder", path=str(data), limit=0, hflip=False),
        train=replace(TrainConfig(), **CONTROLNET_TRAIN), sample=replace(config.sample, n=min(config.sample.n, 8)), eval=EvalConfig(),
        controlnet=ControlNetConfig(base=str(base or ""), control=str(control)),
    )
    return apply_overrides(config, list(overrides), values)


def train_controlnet(config: Config, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Train into `run_dir` (a new run, or --resume the run there) with a config from controlnet_config."""
    if config.task != "controlnet":
        raise UserError("this is not a ControlNet training config: make one with controlnet_config(BASE, DATA, CONTROL)")
    return run_training(ControlNetRecipe, config, run_dir, resume=resume, overwrite=overwrite, progress=progress)


def control_folder_images(folder: str | Path, names: list[str], size: int) -> torch.Tensor:
    """uint8 [N, 3, size, size]: the control image of each training image, by the same relative file name."""
    images, control_names, _ = load_folder(folder, size, 3, "abort", 0, progress=False)
    index = {name: i for i, name in enumerate(control_names)}
    missing = [name for name in names if name not in index]
    if missing:
        raise UserError(f"the control folder '{folder}' has no image named {missing[0]!r} ({len(missing)} of {len(names)} missing); "
                        "give each training image a control image with the same file name")
    return images[[index[name] for name in names]]


class ControlBatches(DiffusionBatches):
    """The diffusion batches with each image's control image in the condition (`control`, [B, 3, H, W] in [0, 1])."""

    def __init__(self, trainer, vae, controls: torch.Tensor):
        super().__init__(trainer, vae)
        self.controls = controls  # uint8 [N, 3, H, W], a row per dataset item

    def next_batch(self):
        x0, cond, weights = super().next_batch()
        control = (to_float(self.controls[self.last_indices]).to(self.device) + 1) / 2
        return x0, {**(cond or {}), "control": control}, weights


class ControlNetRecipe(Recipe):
    """A ControlNet on a frozen base model learns the control images with the diffusion loss."""

    single_process_reason = "ControlNet training runs in one process"

    def load_data(self):
        t = self.trainer
        c, dc = t.config.controlnet, t.config.data
        if t.config.eval.every:
            raise UserError("eval.every: a ControlNet run has no evaluation (its samples need control images); leave it at 0")
        if dc.hflip:
            raise UserError("data.hflip would flip an image but not its control image; leave it off for a ControlNet run")
        self.base = load_model(base_path(c.base))
        check_base(t, "controlnet", weights_fingerprint(self.base.net))
        images, names, skipped = load_folder(dc.path, dc.image_size, dc.channels, dc.bad_images, dc.limit, t.progress)
        dataset = ImageDataset(images, skipped=skipped, captions=read_captions(dc.path, names))
        print(describe_captions(dc.path, len(dataset), dataset.captions))
        if c.control in ANNOTATORS:
            self.controls = annotate(images, c.control, t.config.train.seed)
        else:
            self.controls = control_folder_images(c.control, names, dc.image_size)
        self.vae = None
        if self.base.vae is None:
            return dataset
        self.vae = prepare_module(self.base.vae, t.device).requires_grad_(False).eval()
        spec = json.dumps([asdict(dc), t.config.controlnet.base_fingerprint])
        return latent_dataset(dataset, self.vae, f"controlnet-{hashlib.sha256(spec.encode()).hexdigest()[:16]}", t.device, t.progress)

    def build(self) -> Trained:
        t = self.trainer
        self.schedule = make_schedule(t.config.diffusion)
        self.unet = prepare_module(self.base.net, t.device).requires_grad_(False).eval()
        encoder = self.base.text_encoder.to(t.device) if self.base.text_encoder is not None else None
        self.batches = ControlBatches(t, self.vae, self.controls)
        self.batches.use_captions(encoder)
        torch.manual_seed(t.config.train.seed)  # the conditioning embedding's initial weights, whatever loading drew before
        factor = self.vae.downsample_factor if self.vae is not None else 1
        controlnet = ControlNet.from_unet(self.unet, t.config.model, embedding_channels=embedding_channels_for(factor)).to(t.device)
        return Trained(controlnet, runs_through=ControlledUNet(self.unet, controlnet))

    def train_step(self) -> dict[str, float]:
        return diffusion_step(self.trainer, self.batches, self.schedule)

    def sample_grid(self) -> Path:
        """RUN/samples/step_N.png: the first images' control images (top row) over what the EMA ControlNet draws from them."""
        t = self.trainer
        sc = t.config.sample
        rows = torch.arange(min(sc.n, len(self.controls)))
        prompts = [t.dataset.captions[i] for i in rows.tolist()] if self.batches.captions is not None else None
        pipe = self.batches.pipeline(self.unet)
        pipe.add_controlnet(t.ema, "training")
        controls = to_float(self.controls[rows])
        images = pipe.sample(len(rows), steps=sc.steps, sampler=sc.sampler, spacing=sc.spacing, seed=sc.seed, prompts=prompts,
                             control_image=controls)
        path = save_grid(torch.cat([controls, images]), t.run_dir / "samples" / f"step_{t.state.step:08d}.png", ncols=len(rows))
        if prompts is not None:
            write_json_atomic(path.with_suffix(".json"), {"prompts": prompts})
        return path

    def evaluate(self) -> dict:
        return {}

    def on_start(self, resumed: bool) -> None:
        """The grid before training (step 0: the base model, the ControlNet's convolutions being zero), or on resume the
        ControlNet folder of its checkpoint."""
        if resumed:
            self.write_folder(final=False)
        elif self.trainer.state.step == 0:
            self.trainer.try_sample_grid()

    def on_saved(self, checkpoint: Path, final: bool) -> None:
        self.write_folder(final)

    def write_folder(self, final: bool) -> None:
        """RUN/controlnet/: the EMA ControlNet as a diffusers ControlNetModel folder."""
        path = self.trainer.run_dir / RUN_FOLDER
        save_output("the ControlNet folder", path, lambda: write_controlnet(self.trainer.ema, path, replace_existing=True), final)

