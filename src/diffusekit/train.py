"""The training loop: AdamW with warm-up, gradient clipping and accumulation, EMA,
bf16 autocast on GPU, progress bar, metrics.jsonl, sample grids, time and step
budgets, atomic checkpoints and a resume that continues bit for bit.

    RUN/config.json  RUN/metrics.jsonl  RUN/samples/step_*.png  RUN/checkpoints/...
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffusekit.config import RESUMABLE_KEYS, RESUMABLE_SECTIONS, Config, config_to_dict, diff_configs
from diffusekit.data import BatchStream, load_dataset, to_float
from diffusekit.errors import UserError
from diffusekit.images import save_grid
from diffusekit.io.checkpoint import (
    flatten_optimizer_state,
    latest_checkpoint,
    load_state_dict_checked,
    read_json,
    read_tensors,
    save_checkpoint,
    unflatten_optimizer_state,
    write_json_atomic,
)
from diffusekit.losses import diffusion_loss, draw_t_and_noise
from diffusekit.optim import ema_decay_at, ema_update, lr_at, make_optimizer
from diffusekit.pipeline import Pipeline, build_unet, load_config
from diffusekit.runtime import parse_duration, pick_device, prepare_module, use_all_cores
from diffusekit.schedule import NoiseSchedule


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path
    stopped_by: str  # "max_steps" | "budget"
    images_per_second: float
    last_loss: float
    train_seconds: float


def prepare_run_dir(run_dir: Path, config: Config, resume: bool, overwrite: bool) -> Path | None:
    """Check the run folder against the request (deleting nothing); returns the checkpoint to resume from, if any."""
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise UserError(f"nothing to resume in '{run_dir}': it has no complete checkpoint; drop --resume to start a new run there")
        saved = load_config(ckpt)
        clashes = [(k, a, b) for k, a, b in diff_configs(saved, config) if k not in RESUMABLE_KEYS and k.split(".")[0] not in RESUMABLE_SECTIONS]
        if clashes:
            listed = "; ".join(f"{k}: {a!r} in the run, {b!r} asked" for k, a, b in clashes[:5])
            raise UserError(
                f"the checkpoint in '{run_dir}' was trained with another config ({listed}); resume without those "
                "--set changes, or start a new run with another --out"
            )
        return ckpt
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise UserError(f"'{run_dir}' already holds files; pass --resume to continue that run, --overwrite to replace it, or choose another --out")
    return None


class Trainer:
    def __init__(self, config: Config, run_dir: str | Path, progress: bool = True):
        self.config, self.run_dir, self.progress = config, Path(run_dir), progress
        tc = config.train
        self.device = pick_device(tc.device)
        use_all_cores(tc.threads)
        self.use_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        torch.manual_seed(tc.seed)  # initial weights
        self.dataset = load_dataset(config.data, progress)
        self.net = prepare_module(build_unet(config), self.device)
        self.ema = copy.deepcopy(self.net).requires_grad_(False).eval()
        self.optimizer = make_optimizer(self.net.parameters(), tc)
        self.schedule = NoiseSchedule.from_config(config.diffusion)
        self.stream = BatchStream(len(self.dataset), tc.batch_size * tc.grad_accumulation, tc.seed)
        self.generator = torch.Generator(self.device).manual_seed(tc.seed + 1)  # t, noise and flips
        self.step, self.images_seen, self.train_seconds = 0, 0, 0.0
        self.labels = self._class_labels()

    def _class_labels(self) -> torch.Tensor | None:
        wanted, dataset = self.config.model.num_classes, self.dataset
        if not wanted:
            return None
        if dataset.labels is None:
            raise UserError(f"model.num_classes = {wanted} but the {self.config.data.dataset} dataset has no class labels; set model.num_classes=0")
        if dataset.num_classes != wanted:
            raise UserError(f"model.num_classes = {wanted} but the dataset has {dataset.num_classes} classes; set model.num_classes={dataset.num_classes}")
        return dataset.labels.to(self.device)

    # ------------------------------------------------------------------ state

    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        opt_tensors, _ = flatten_optimizer_state(self.optimizer.state_dict())
        rng = {"torch": torch.get_rng_state(), "train_generator": self.generator.get_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        return {"model": self.net.state_dict(), "ema": self.ema.state_dict(), "optimizer": opt_tensors, "rng": rng}

    def state_json(self) -> dict:
        _, opt_rest = flatten_optimizer_state(self.optimizer.state_dict())
        return {
            "step": self.step,
            "images_seen": self.images_seen,
            "train_seconds": self.train_seconds,
            "data": self.stream.state_dict(),
            "optimizer": opt_rest,
        }

    def save(self) -> Path:
        return save_checkpoint(self.run_dir, self.step, self.state_tensors(), self.state_json(), config_to_dict(self.config), self.config.train.keep_checkpoints)

    def load(self, ckpt: Path) -> None:
        load_state_dict_checked(self.net, read_tensors(ckpt / "model.safetensors"), str(ckpt))
        load_state_dict_checked(self.ema, read_tensors(ckpt / "ema.safetensors"), str(ckpt))
        state = read_json(ckpt / "state.json", "training state")
        self.optimizer.load_state_dict(unflatten_optimizer_state(read_tensors(ckpt / "optimizer.safetensors"), state["optimizer"]))
        rng = read_tensors(ckpt / "rng.safetensors")
        torch.set_rng_state(rng["torch"])
        self.generator.set_state(rng["train_generator"])
        cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
        self.stream.load_state_dict(state["data"])
        self.step, self.images_seen, self.train_seconds = state["step"], state["images_seen"], state["train_seconds"]

    # ------------------------------------------------------------------ one step

    def next_batch(self) -> tuple[torch.Tensor, dict | None]:
        idx = self.stream.next_indices()
        x0 = to_float(self.dataset.images[idx]).to(self.device)
        if self.config.data.hflip:
            flip = torch.rand(len(idx), generator=self.generator, device=self.generator.device).to(self.device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        if self.labels is None:
            return x0, None
        labels = self.labels[idx.to(self.device)]
        if self.config.train.label_dropout > 0:  # the null class, so that guidance has an unconditional model
            drop = torch.rand(len(idx), generator=self.generator, device=self.generator.device).to(self.device) < self.config.train.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.config.model.num_classes), labels)
        return x0, {"class_labels": labels}

    def train_step(self) -> float:
        tc, dc = self.config.train, self.config.diffusion
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, tc)
        x0, cond = self.next_batch()
        t, noise = draw_t_and_noise(self.schedule, x0, self.generator)  # for the whole batch, then split
        micro = tc.batch_size
        total = 0.0
        for i in range(tc.grad_accumulation):
            part = slice(i * micro, (i + 1) * micro)
            part_cond = {k: v[part] for k, v in cond.items()} if cond else None
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                loss = diffusion_loss(
                    self.net, self.schedule, x0[part], prediction=dc.prediction, weighting=dc.loss_weighting,
                    snr_gamma=dc.snr_gamma, cond=part_cond, t=t[part], noise=noise[part],
                )
            (loss / tc.grad_accumulation).backward()
            total += loss.detach()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), tc.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        ema_update(self.ema, self.net, ema_decay_at(self.step, tc.ema_decay, tc.ema_warmup))
        self.step += 1
        self.images_seen += len(x0)
        return float(total) / tc.grad_accumulation

    # ------------------------------------------------------------------ outputs

    def log(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def sample_grid(self) -> Path:
        sc = self.config.sample
        pipe = Pipeline(self.config, self.ema, self.device)
        classes = self.config.model.num_classes
        labels = torch.arange(sc.n) % classes if classes else None  # one class per column
        images = pipe.sample(sc.n, steps=sc.steps, sampler=sc.sampler, spacing=sc.spacing, seed=sc.seed, labels=labels)
        return save_grid(images, self.run_dir / "samples" / f"step_{self.step:08d}.png", ncols=classes or None)

    def evaluate(self) -> dict:
        from diffusekit.evaluate import evaluate_checkpoint

        ec = self.config.eval
        pipe = Pipeline(self.config, self.ema, self.device)
        report = evaluate_checkpoint(None, n=ec.n, sampler=ec.sampler, steps=ec.steps, features=ec.features or None, pipeline=pipe)
        self.log({"step": self.step, "eval": {k: v for k, v in report.items() if k not in ("checkpoint", "step")}})
        return report

    # ------------------------------------------------------------------ the loop

    def run(self, resume_from: Path | None = None) -> TrainResult:
        tc = self.config.train
        if resume_from is not None:
            self.load(resume_from)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_dir / "config.json", config_to_dict(self.config))
        budget = parse_duration(tc.budget) if tc.budget else None
        start, session_images, session_train = time.perf_counter(), 0, 0.0
        losses: list[float] = []
        stopped_by = "max_steps"
        last_ckpt = resume_from
        bar = tqdm(total=tc.max_steps, initial=self.step, desc="training", unit="step", disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        self.net.train()
        while self.step < tc.max_steps:
            if budget is not None and time.perf_counter() - start >= budget:
                stopped_by = "budget"
                break
            t0 = time.perf_counter()
            losses.append(self.train_step())
            elapsed = time.perf_counter() - t0
            session_train += elapsed
            self.train_seconds += elapsed
            session_images += tc.batch_size * tc.grad_accumulation
            rate = session_images / max(session_train, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{rate:.0f}")
            if self.step % tc.log_every == 0:
                recent = losses[-tc.log_every :]
                self.log({"step": self.step, "loss": sum(recent) / len(recent), "lr": self.optimizer.param_groups[0]["lr"],
                          "images_per_s": rate, "elapsed_s": time.perf_counter() - start, "epoch": self.stream.epoch})
            if tc.sample_every and self.step % tc.sample_every == 0:
                self.sample_grid()
            if self.config.eval.every and self.step % self.config.eval.every == 0:
                self.evaluate()
            if self.step % tc.checkpoint_every == 0:
                last_ckpt = self.save()
        bar.close()
        if last_ckpt is None or last_ckpt.name != f"step_{self.step:08d}":
            last_ckpt = self.save()
        grid = self.sample_grid()
        rate = session_images / max(session_train, 1e-9)
        print(f"stopped at step {self.step} ({stopped_by}); {rate:.1f} images/s; checkpoint {last_ckpt}; samples {grid}", file=sys.stderr)
        return TrainResult(self.run_dir, self.step, last_ckpt, stopped_by, rate, losses[-1] if losses else float("nan"), session_train)


def train(config: Config, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Train `config` into `run_dir` (a new run, or --resume the run there)."""
    run_dir = Path(run_dir)
    ckpt = prepare_run_dir(run_dir, config, resume, overwrite)  # on resume, config differs only in resumable keys
    trainer = Trainer(config, run_dir, progress)  # loads the data: a bad dataset fails here, before anything is deleted
    if overwrite and ckpt is None and run_dir.exists():
        shutil.rmtree(run_dir)
    return trainer.run(resume_from=ckpt)
