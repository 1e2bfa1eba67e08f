"""The one training loop every model diffusekit trains goes through.

    Trainer(config, run_dir, DiffusionRecipe).run()    # or run_training(DiffusionRecipe, config, run_dir)
A Recipe says what a kind of run trains: it loads the data, builds the parts (Trained: what the
optimizer trains, what else a checkpoint holds), writes one optimizer step (its loss) and what to
show (sample grids, evaluations). The Trainer does the rest: data order, warm-up/cosine learning rate,
EMA, a tqdm bar, metrics.jsonl, time and step budgets, atomic checkpoints and a resume that continues
bit for bit (the training state, training_state.TrainingState, is one object the trainer owns). Recipes:
DiffusionRecipe, FinetuneRecipe, DistillRecipe, AutoencoderRecipe, ControlNetRecipe. What a run writes:
    RUN/config.json  RUN/metrics.jsonl  RUN/samples/step_*.png  RUN/checkpoints/step_*/

Several processes (torchrun; distributed.py): train.batch_size is per rank, so a step
sees batch_size x grad_accumulation x ranks images (the global batch). Rank r trains on
every world-th image of the global batch (BatchStream), DistributedDataParallel averages
the gradients, and so every rank makes the same optimizer step and keeps the same EMA.
Randomness per image (t, noise, flips, dropped labels) is drawn for the whole global
batch from a generator in the same state on every rank, and each rank keeps its own
rows: the run does not depend on how the global batch is split into ranks. Rank 0 alone
logs and writes files, and the others wait for it at every checkpoint. The data position
is counted in global indices, so a run may resume with another number of processes.

Surviving failures: a checkpoint every train.checkpoint_every steps and at least every
train.checkpoint_minutes of wall time, so a kill at any moment loses little; a resume takes
the last complete checkpoint, or the newest intact one if that is damaged (io/checkpoint.py);
a failed save (full disk) keeps the previous checkpoint and the run goes on, except for the
final save; a NaN/inf loss stops the run (train.on_nan = "stop") or skips that batch ("skip").
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffusekit import distributed, training_state
from diffusekit.compiled import compile_network, unwrap
from diffusekit.config import Config, config_to_dict
from diffusekit.data import BatchStream
from diffusekit.devices import pick_device, use_all_cores
from diffusekit.durations import parse_duration
from diffusekit.errors import UserError, warn
from diffusekit.files import write_json_atomic
from diffusekit.io.checkpoint import checkpoint_name, remove_stale_temp_files
from diffusekit.io.runs import clear_run_dir, drop_records_after, prepare_run_dir
from diffusekit.optim import ema_decay_at, ema_update, lr_at, make_optimizer
from diffusekit.precision import training_dtype
from diffusekit.training_state import TrainingState

wall_clock = time.monotonic  # what train.checkpoint_minutes are measured on (tests replace it)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path
    stopped_by: str  # "max_steps" | "budget"
    images_per_second: float
    last_loss: float
    train_seconds: float
    skipped_steps: int = 0  # batches skipped for a non-finite loss (train.on_nan = "skip"), over the whole run


def run_training(recipe: type["Recipe"], config: Config, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
                 progress: bool = True) -> TrainResult:
    """Train into `run_dir`: a new run, or (resume) the run there, continued exactly.

    Under torchrun every process calls this; the process group lives as long as the call.
    """
    run_dir = Path(run_dir)
    with distributed.process_group(config.train.device):
        ckpt = prepare_run_dir(run_dir, config, resume, overwrite)  # on resume, config differs only in resumable keys
        trainer = Trainer(config, run_dir, recipe, progress, resume_from=ckpt)  # loads the data: a bad dataset fails here, before anything is deleted
        if overwrite and ckpt is None and run_dir.exists() and distributed.is_main():
            clear_run_dir(run_dir)
        result = trainer.run(resume_from=ckpt)
        del trainer  # it and its recipe refer to each other: free them (DDP holds the process group) while the group is up,
        gc.collect()  # not in a garbage collection after it is gone (gloo aborts then)
        return result


def window_means(window: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each logged value over the steps that reported it."""
    keys = dict.fromkeys(k for record in window for k in record)
    return {k: sum(r[k] for r in window if k in r) / sum(k in r for r in window) for k in keys}


class Recipe:
    """What one kind of run trains, handed to the one Trainer (composition, not a subclass of it).

    The trainer calls, once and in this order: load_data() (the dataset; its length sets the data order),
    build() (a Trained: what trains, what else a checkpoint holds), then train_step() per optimizer step,
    sample_grid() / evaluate() now and then, checkpoint_config() with each save, and the hooks on_start
    (the run folder is ready) and on_saved (a checkpoint was written). A recipe reads the run's config,
    device, generator and counters from `self.trainer` and steps through its helpers (optimizer_step,
    backward_micro_batches, finish_step)."""

    single_process_reason = ""  # why this kind of run cannot train in several processes ("": it can)

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer

    def load_data(self):
        raise NotImplementedError

    def build(self) -> "Trained":
        raise NotImplementedError

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns the losses to log ("loss" first)."""
        raise NotImplementedError

    def sample_grid(self) -> Path:
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    def checkpoint_config(self) -> dict:
        """The config saved in each checkpoint."""
        return config_to_dict(self.trainer.config)

    def ema_age(self, step: int) -> int:
        """The steps the EMA's warm-up counts at `step` (the run's; a distillation stage starts its own)."""
        return step

    def on_start(self, resumed: bool) -> None:
        """The run folder is ready and no step has run in this session."""

    def on_saved(self, checkpoint: Path, final: bool) -> None:
        """A checkpoint was written (every rank is told)."""


@dataclass
class Trained:
    """The parts a recipe builds. `net` is what the optimizer trains and the EMA follows; `saved` are the other
    modules every checkpoint holds (a latent model's VAE, a distillation's teacher, a discriminator), with their
    `optimizers` if they train too; `runs_through` is the network a step calls when the trained parameters
    sit inside another one (LoRAs in a frozen U-Net), else the net (wrapped for several processes)."""

    net: torch.nn.Module
    saved: dict[str, torch.nn.Module] = field(default_factory=dict)
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    runs_through: torch.nn.Module | None = None


class Trainer:
    """The one training loop: a recipe (what trains, its loss, what a checkpoint holds) plus everything every run
    shares. The training state (counters, generator, data order) is one object, self.state."""

    def __init__(self, config: Config, run_dir: str | Path, recipe: type[Recipe], progress: bool = True, resume_from: Path | None = None):
        self.config, self.run_dir, self.progress = config, Path(run_dir), progress
        self.resume_from = resume_from  # the checkpoint run() will continue from (a recipe may read it while building)
        tc = config.train
        self.rank, self.world = distributed.rank(), distributed.world()
        if self.world > 1 and recipe.single_process_reason:
            raise UserError(f"{recipe.single_process_reason}; start it without torchrun")
        self.device = distributed.device_of_this_rank(pick_device(tc.device))
        use_all_cores(distributed.thread_share(tc.threads))
        self.autocast_dtype = training_dtype(tc.precision, self.device)  # None: float32; the weights stay float32 either way
        self.recipe = recipe(self)
        torch.manual_seed(tc.seed)  # initial weights (the same on every rank)
        self.dataset = distributed.main_first(self.recipe.load_data)  # caches on disk are filled by one process at a time
        generator = torch.Generator(self.device).manual_seed(tc.seed + 1)  # everything random in a step; in step on every rank
        self.state = TrainingState(generator, BatchStream(len(self.dataset), tc.batch_size * tc.grad_accumulation, tc.seed, self.rank, self.world))
        trained = self.recipe.build()
        self.net, self.saved = trained.net, trained.saved
        self.ema = copy.deepcopy(self.net).requires_grad_(False).eval()
        self.optimizers = {"optimizer": make_optimizer(self.net.parameters(), tc), **trained.optimizers}
        self.train_net = trained.runs_through if trained.runs_through is not None else self.wrap_for_ranks(self.net)
        if tc.compile:
            self.train_net = compile_network(self.train_net)
        if self.rank:
            torch.manual_seed(distributed.rank_seed(tc.seed, self.rank))  # each rank its own dropout masks

    def wrap_for_ranks(self, net: torch.nn.Module) -> torch.nn.Module:
        """With several processes, DistributedDataParallel: it averages the gradients over the ranks in backward."""
        if self.world <= 1:
            return net
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device] if self.device.type == "cuda" else None
        return DistributedDataParallel(net, device_ids=device_ids)

    @property
    def global_batch(self) -> int:
        tc = self.config.train
        return tc.batch_size * tc.grad_accumulation * self.world

    @property
    def generator(self) -> torch.Generator:
        return self.state.generator

    def train_step(self) -> dict[str, float]:
        return self.recipe.train_step()

    # ------------------------------------------------------------------ helpers for a recipe's train_step

    def set_learning_rates(self) -> None:
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = lr_at(self.state.step, self.config.train)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=self.autocast_dtype is not None)

    def gradient_sync(self, last: bool):
        """Wrap one micro-batch's forward and backward: with several processes the gradients are
        averaged over the ranks only on the last micro-batch of a step (DDP's no_sync before)."""
        return unwrap(self.train_net).no_sync() if self.world > 1 and not last else contextlib.nullcontext()

    def backward_micro_batches(self, cond: dict | None, loss_of) -> float:
        """Forward and backward the batch in train.grad_accumulation micro-batches of train.batch_size;
        loss_of(part, cond[part]) is the loss of the micro-batch `part` (a slice of the batch's rows). Returns the mean loss."""
        tc = self.config.train
        micro, total = tc.batch_size, 0.0
        for i in range(tc.grad_accumulation):
            part = slice(i * micro, (i + 1) * micro)
            part_cond = {k: v[part] for k, v in cond.items()} if cond else None
            with self.gradient_sync(last=i == tc.grad_accumulation - 1):
                with self.autocast():
                    loss = loss_of(part, part_cond)
                (loss / tc.grad_accumulation).backward()
            total += loss.detach()
        return float(total) / tc.grad_accumulation

    def optimizer_step(self, name: str = "optimizer", module: torch.nn.Module | None = None) -> bool:
        """Clip the gradients of `module` (default: the net), step the optimizer, clear gradients; whether it stepped.

        Gradients that are not finite (a NaN/inf loss; with several processes on any rank, as DDP
        averages it into every rank's gradients) stop the run, or with train.on_nan = "skip"
        the step is skipped: no optimizer step here (False), and finish_step then leaves the EMA alone.
        """
        module, clip = module or self.net, self.config.train.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(module.parameters(), clip if clip > 0 else float("inf"))  # inf: only measures
        if not torch.isfinite(norm):
            self.optimizers[name].zero_grad(set_to_none=True)
            self.not_finite()
            return False
        self.optimizers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)
        return True

    def not_finite(self) -> None:
        step, tc = self.state.step + 1, self.config.train
        if tc.on_nan == "stop":
            raise UserError(
                f"the loss became NaN or infinite at step {step}, so training stopped; the checkpoints in "
                f"'{self.run_dir / 'checkpoints'}' hold only finite weights. Start again with a lower train.lr (now {tc.lr:g}) "
                f"or a train.grad_clip (now {tc.grad_clip:g}), or --resume with --set train.on_nan=skip to skip such batches"
            )
        if self.rank == 0:
            warn(f"the loss is NaN or infinite at step {step}; that batch is skipped (train.on_nan = skip)")

    def finish_step(self, batch_size: int, stepped: bool) -> None:
        """After the optimizer step(s): the EMA follows (unless the step was skipped), count the step and its images."""
        tc, state = self.config.train, self.state
        if not stepped:
            state.skipped_steps += 1
        else:
            ema_update(self.ema, self.net, ema_decay_at(self.recipe.ema_age(state.step), tc.ema_decay, tc.ema_warmup))
        state.step += 1
        state.images_seen += batch_size * self.world

    # ------------------------------------------------------------------ state

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.net, "ema": self.ema, **self.saved}

    def save(self, final: bool = False) -> Path | None:
        """A checkpoint of the run now (training_state.save); the recipe hears of it."""
        ckpt = training_state.save(self, final)
        if ckpt is not None:
            self.recipe.on_saved(ckpt, final)
        return ckpt

    # ------------------------------------------------------------------ the loop

    def log(self, record: dict) -> None:
        """Append a line to metrics.jsonl (rank 0; a write that fails is a warning)."""
        if self.rank == 0:
            try:
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as err:
                warn(f"could not write to {self.run_dir / 'metrics.jsonl'} ({err})")

    def try_sample_grid(self) -> Path | None:
        """A sample grid (rank 0); one that cannot be made (full disk, a bad sample.* value) is a warning,
        never a crash of rank 0 that would leave the other ranks waiting."""
        try:
            return self.recipe.sample_grid()
        except (OSError, UserError) as err:
            warn(f"could not write a sample grid ({err})")
            return None

    def try_evaluate(self) -> None:
        """A periodic evaluation logged to metrics.jsonl (rank 0); a failure (e.g. missing Inception weights) is a warning."""
        try:
            report = self.recipe.evaluate()
        except (OSError, UserError) as err:
            warn(f"could not evaluate at step {self.state.step} ({err})")
            return
        self.log({"step": self.state.step, "eval": {k: v for k, v in report.items() if k not in ("checkpoint", "step")}})

    def start_outputs(self, resumed: bool) -> None:
        """Rank 0 prepares the run folder: config.json, no leftovers of a killed save, no metrics past the checkpoint.
        If that cannot be written (a full disk), every rank stops with one message, before any step."""
        problem = None
        if self.rank == 0:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                write_json_atomic(self.run_dir / "config.json", config_to_dict(self.config))
                remove_stale_temp_files(self.run_dir)
                if resumed:
                    drop_records_after(self.run_dir / "metrics.jsonl", self.state.step)
            except OSError as err:
                problem = f"could not write to the run folder '{self.run_dir}' ({err})"
        problem = distributed.broadcast_from_main(problem)
        if problem:
            kept = "its checkpoints are intact" if resumed else "nothing was trained"
            raise UserError(f"{problem}; {kept}: free some space or fix the permissions, then run again")

    def over_budget(self, start: float, budget: float | None) -> bool:
        """Whether the time budget is spent; with several processes, on any rank (they stop together)."""
        if budget is None:
            return False
        return distributed.any_rank(time.perf_counter() - start >= budget, self.device)

    def checkpoint_due(self, last_save: float) -> bool:
        """Whether train.checkpoint_minutes have passed since `last_save` (on any rank: they save together)."""
        minutes = self.config.train.checkpoint_minutes
        return minutes > 0 and distributed.any_rank(wall_clock() - last_save >= 60 * minutes, self.device)

    def log_window(self, window: list[dict[str, float]], rate: float, elapsed: float) -> None:
        """The mean losses since the last log (over all ranks) and the speed, as one metrics.jsonl line."""
        means = distributed.mean_over_ranks(window_means(window), self.device)
        self.log({"step": self.state.step, **means, "lr": self.optimizers["optimizer"].param_groups[0]["lr"], "images_per_s": rate,
                  "elapsed_s": elapsed, "epoch": self.state.stream.epoch, **({"skipped_steps": self.state.skipped_steps} if self.state.skipped_steps else {})})

    def run(self, resume_from: Path | None = None) -> TrainResult:
        tc = self.config.train
        if resume_from is not None:
            training_state.restore(self, resume_from)
        self.start_outputs(resumed=resume_from is not None)
        self.recipe.on_start(resumed=resume_from is not None)
        budget = parse_duration(tc.budget) if tc.budget else None
        start, session_images, session_train = time.perf_counter(), 0, 0.0
        window: list[dict[str, float]] = []
        stopped_by, last_ckpt, last_loss, last_save = "max_steps", resume_from, float("nan"), wall_clock()
        bar = tqdm(total=tc.max_steps, initial=self.state.step, desc="training", unit="step", disable=not self.progress or self.rank != 0,
                   file=sys.stderr, dynamic_ncols=True)
        for module in self.modules().values():  # train mode for what is trained (not the EMA, not a frozen VAE)
            module.train(any(p.requires_grad for p in module.parameters()))
        while self.state.step < tc.max_steps:
            if self.over_budget(start, budget):
                stopped_by = "budget"
                break
            t0 = time.perf_counter()
            self.set_learning_rates()
            skipped_before = self.state.skipped_steps
            losses = self.train_step()
            elapsed = time.perf_counter() - t0
            session_train += elapsed
            self.state.train_seconds += elapsed
            session_images += self.global_batch
            rate = session_images / max(session_train, 1e-9)
            if self.state.skipped_steps == skipped_before:
                window.append(losses)
                last_loss = losses["loss"]
            bar.update(1)
            bar.set_postfix(loss=f"{losses['loss']:.4f}", img_s=f"{rate:.0f}")
            if self.state.step % tc.log_every == 0:
                self.log_window(window, rate, time.perf_counter() - start)
                window = []
            if tc.sample_every and self.state.step % tc.sample_every == 0 and self.rank == 0:
                self.try_sample_grid()
            if self.config.eval.every and self.state.step % self.config.eval.every == 0 and self.rank == 0:
                self.try_evaluate()
            if self.state.step % tc.checkpoint_every == 0 or self.checkpoint_due(last_save):
                last_ckpt = self.save() or last_ckpt
                last_save = wall_clock()  # a failed save too: the next try waits as long
        bar.close()
        if last_ckpt is None or last_ckpt.name != checkpoint_name(self.state.step):
            last_ckpt = self.save(final=True)
        rate = session_images / max(session_train, 1e-9)
        if self.rank == 0:
            grid = self.try_sample_grid()
            skipped = f"; {self.state.skipped_steps} batch(es) skipped for a NaN/inf loss" if self.state.skipped_steps else ""
            print(f"stopped at step {self.state.step} ({stopped_by}); {rate:.1f} images/s{skipped}; checkpoint {last_ckpt}; samples {grid}", file=sys.stderr)
        return TrainResult(self.run_dir, self.state.step, last_ckpt, stopped_by, rate, last_loss, session_train, self.state.skipped_steps)
