"""The generic training loop shared by every model diffusekit trains.

A Trainer subclass builds its networks (`build`), says how one optimizer step goes
(`train_step`) and what to show (`sample_grid`, `evaluate`). This base does the rest:
data order, warm-up/cosine learning rate, EMA, a tqdm bar, metrics.jsonl, time and step
budgets, atomic checkpoints and a resume that continues bit for bit.

    RUN/config.json  RUN/metrics.jsonl  RUN/samples/step_*.png  RUN/checkpoints/step_*/
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
from diffusekit.data import BatchStream
from diffusekit.errors import UserError
from diffusekit.io.checkpoint import (
    checkpoint_name,
    flatten_optimizer_state,
    latest_checkpoint,
    load_state_dict_checked,
    read_json,
    read_tensors,
    save_checkpoint,
    unflatten_optimizer_state,
    write_json_atomic,
)
from diffusekit.optim import ema_decay_at, ema_update, lr_at, make_optimizer
from diffusekit.pipeline import load_config
from diffusekit.runtime import parse_duration, pick_device, prepare_module, use_all_cores


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


def run_training(trainer_class, config: Config, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Train into `run_dir`: a new run, or (resume) the run there, continued exactly."""
    run_dir = Path(run_dir)
    ckpt = prepare_run_dir(run_dir, config, resume, overwrite)  # on resume, config differs only in resumable keys
    trainer = trainer_class(config, run_dir, progress)  # loads the data: a bad dataset fails here, before anything is deleted
    if overwrite and ckpt is None and run_dir.exists():
        shutil.rmtree(run_dir)
    return trainer.run(resume_from=ckpt)


class Trainer:
    """Subclasses set self.net (the trained network, whose EMA is kept) in build(), and may add
    more modules and optimizers to self.extra_modules / self.optimizers."""

    def __init__(self, config: Config, run_dir: str | Path, progress: bool = True):
        self.config, self.run_dir, self.progress = config, Path(run_dir), progress
        tc = config.train
        self.device = pick_device(tc.device)
        use_all_cores(tc.threads)
        self.use_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        torch.manual_seed(tc.seed)  # initial weights
        self.dataset = self.load_data()
        self.stream = BatchStream(len(self.dataset), tc.batch_size * tc.grad_accumulation, tc.seed)
        self.generator = torch.Generator(self.device).manual_seed(tc.seed + 1)  # everything random in a step
        self.step, self.images_seen, self.train_seconds = 0, 0, 0.0
        self.extra_modules: dict[str, torch.nn.Module] = {}
        self.net = prepare_module(self.build(), self.device)
        self.ema = copy.deepcopy(self.net).requires_grad_(False).eval()
        self.optimizers = {"optimizer": make_optimizer(self.net.parameters(), tc)}

    # ------------------------------------------------------------------ what subclasses provide

    def load_data(self):
        raise NotImplementedError

    def build(self) -> torch.nn.Module:
        raise NotImplementedError

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns the losses to log ("loss" first)."""
        raise NotImplementedError

    def sample_grid(self) -> Path:
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers for train_step

    def set_learning_rates(self) -> None:
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = lr_at(self.step, self.config.train)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    def optimizer_step(self, name: str = "optimizer", module: torch.nn.Module | None = None) -> None:
        """Clip the gradients of `module` (default: the net), step the optimizer, clear gradients."""
        module = module or self.net
        if self.config.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(module.parameters(), self.config.train.grad_clip)
        self.optimizers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)

    def finish_step(self, batch_size: int) -> None:
        tc = self.config.train
        ema_update(self.ema, self.net, ema_decay_at(self.step, tc.ema_decay, tc.ema_warmup))
        self.step += 1
        self.images_seen += batch_size

    # ------------------------------------------------------------------ state

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.net, "ema": self.ema, **self.extra_modules}

    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        rng = {"torch": torch.get_rng_state(), "train_generator": self.generator.get_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        tensors = {name: module.state_dict() for name, module in self.modules().items()}
        tensors.update({name: flatten_optimizer_state(opt.state_dict())[0] for name, opt in self.optimizers.items()})
        return {**tensors, "rng": rng}

    def state_json(self) -> dict:
        return {
            "step": self.step,
            "images_seen": self.images_seen,
            "train_seconds": self.train_seconds,
            "data": self.stream.state_dict(),
            "optimizers": {name: flatten_optimizer_state(opt.state_dict())[1] for name, opt in self.optimizers.items()},
        }

    def checkpoint_config(self) -> dict:
        return config_to_dict(self.config)

    def save(self) -> Path:
        return save_checkpoint(self.run_dir, self.step, self.state_tensors(), self.state_json(), self.checkpoint_config(), self.config.train.keep_checkpoints)

    def load(self, ckpt: Path) -> None:
        for name, module in self.modules().items():
            load_state_dict_checked(module, read_tensors(ckpt / f"{name}.safetensors"), str(ckpt))
        state = read_json(ckpt / "state.json", "training state")
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(unflatten_optimizer_state(read_tensors(ckpt / f"{name}.safetensors"), state["optimizers"][name]))
        rng = read_tensors(ckpt / "rng.safetensors")
        torch.set_rng_state(rng["torch"])
        self.generator.set_state(rng["train_generator"])
        cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
        self.stream.load_state_dict(state["data"])
        self.step, self.images_seen, self.train_seconds = state["step"], state["images_seen"], state["train_seconds"]

    # ------------------------------------------------------------------ the loop

    def log(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def run(self, resume_from: Path | None = None) -> TrainResult:
        tc = self.config.train
        if resume_from is not None:
            self.load(resume_from)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_dir / "config.json", config_to_dict(self.config))
        budget = parse_duration(tc.budget) if tc.budget else None
        start, session_images, session_train = time.perf_counter(), 0, 0.0
        history: list[dict[str, float]] = []
        stopped_by, last_ckpt = "max_steps", resume_from
        bar = tqdm(total=tc.max_steps, initial=self.step, desc="training", unit="step", disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        for module in self.modules().values():  # train mode for what is trained (not the EMA, not a frozen VAE)
            module.train(any(p.requires_grad for p in module.parameters()))
        while self.step < tc.max_steps:
            if budget is not None and time.perf_counter() - start >= budget:
                stopped_by = "budget"
                break
            t0 = time.perf_counter()
            self.set_learning_rates()
            history.append(self.train_step())
            elapsed = time.perf_counter() - t0
            session_train += elapsed
            self.train_seconds += elapsed
            session_images += tc.batch_size * tc.grad_accumulation
            rate = session_images / max(session_train, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", img_s=f"{rate:.0f}")
            if self.step % tc.log_every == 0:
                recent = history[-tc.log_every :]
                means = {k: sum(h[k] for h in recent) / len(recent) for k in recent[-1]}
                self.log({"step": self.step, **means, "lr": self.optimizers["optimizer"].param_groups[0]["lr"],
                          "images_per_s": rate, "elapsed_s": time.perf_counter() - start, "epoch": self.stream.epoch})
            if tc.sample_every and self.step % tc.sample_every == 0:
                self.sample_grid()
            if self.config.eval.every and self.step % self.config.eval.every == 0:
                self.log({"step": self.step, "eval": {k: v for k, v in self.evaluate().items() if k not in ("checkpoint", "step")}})
            if self.step % tc.checkpoint_every == 0:
                last_ckpt = self.save()
        bar.close()
        if last_ckpt is None or last_ckpt.name != checkpoint_name(self.step):
            last_ckpt = self.save()
        grid = self.sample_grid()
        rate = session_images / max(session_train, 1e-9)
        print(f"stopped at step {self.step} ({stopped_by}); {rate:.1f} images/s; checkpoint {last_ckpt}; samples {grid}", file=sys.stderr)
        last_loss = history[-1]["loss"] if history else float("nan")
        return TrainResult(self.run_dir, self.step, last_ckpt, stopped_by, rate, last_loss, session_train)
