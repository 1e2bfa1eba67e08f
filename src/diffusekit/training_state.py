"""A training run's state, and how it goes into a checkpoint and back: what makes `--resume` continue bit for bit.

    state = TrainingState(generator, stream)   # the counters, the generator of every draw, the data order: one object
    checkpoint = save(trainer)      # model, EMA, saved modules, optimizers, RNG states, and the state
    restore(trainer, checkpoint)    # ... put back into a freshly built trainer of the same config

Tensors go to safetensors (one file per module and optimizer, rng.safetensors for the generator
states of every rank), the rest to state.json (io/checkpoint.py writes them atomically).
With several processes every rank calls both: they gather and restore each rank's RNG state,
and rank 0 alone writes while the others wait for the outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from diffusekit import distributed
from diffusekit.data import BatchStream
from diffusekit.errors import UserError, warn
from diffusekit.files import read_json, read_tensors
from diffusekit.io.checkpoint import flatten_optimizer_state, latest_checkpoint, save_checkpoint, unflatten_optimizer_state
from diffusekit.nn.state import load_state_dict_checked


@dataclass
class TrainingState:
    """Where a run is: its counters, the generator every random draw of a step comes from, and the data order."""

    generator: torch.Generator
    stream: BatchStream
    step: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0
    skipped_steps: int = 0  # batches skipped for a non-finite loss (train.on_nan = "skip"), over the whole run

    def counters(self) -> dict:
        return {"step": self.step, "images_seen": self.images_seen, "train_seconds": self.train_seconds, "skipped_steps": self.skipped_steps,
                "data": self.stream.state_dict()}

    def load_counters(self, saved: dict) -> None:
        self.stream.load_state_dict(saved["data"])
        self.step, self.images_seen, self.train_seconds = saved["step"], saved["images_seen"], saved["train_seconds"]
        self.skipped_steps = saved.get("skipped_steps", 0)


def state_tensors(trainer) -> dict[str, dict[str, torch.Tensor]]:
    """Everything a checkpoint holds as tensors: each module's weights, each optimizer's moments, the RNG states."""
    rng = {"train_generator": trainer.state.generator.get_state()}
    for states in distributed.all_gather(distributed.own_rng_states(trainer.device)):
        rng.update(states)
    tensors = {name: module.state_dict() for name, module in trainer.modules().items()}
    tensors.update({name: flatten_optimizer_state(opt.state_dict())[0] for name, opt in trainer.optimizers.items()})
    return {**tensors, "rng": rng}


def state_json(trainer) -> dict:
    return {
        **trainer.state.counters(),
        "processes": trainer.world,
        "global_batch": trainer.global_batch,
        "device": trainer.device.type,  # the training generator's state only fits a generator of this kind
        "optimizers": {name: flatten_optimizer_state(opt.state_dict())[1] for name, opt in trainer.optimizers.items()},
    }


def save(trainer, final: bool = False) -> Path | None:
    """Write a checkpoint (rank 0) while the other ranks wait for the outcome, so nobody races ahead.

    A save that fails (full disk, no permission) keeps the previous checkpoint: a warning, and
    training goes on (None); a failed final save is an error.
    """
    tensors = state_tensors(trainer)
    outcome = write(trainer, tensors) if trainer.rank == 0 else None
    saved, problem = distributed.broadcast_from_main(outcome)
    if saved is not None:
        return Path(saved)
    if final:
        kept = latest_checkpoint(trainer.run_dir)
        then = ("then --resume to continue from it" if kept else
                "then train again: with no checkpoint written, this run cannot be resumed")
        raise UserError(f"could not write the final checkpoint: {problem}; free some space or fix the permissions, {then}")
    if trainer.rank == 0:
        warn(f"could not write a checkpoint: {problem}; training goes on")
    return None


def write(trainer, tensors) -> tuple[str | None, str | None]:
    """(the checkpoint written, None) or (None, what went wrong and which checkpoint is kept)."""
    try:
        ckpt = save_checkpoint(trainer.run_dir, trainer.state.step, tensors, state_json(trainer), trainer.recipe.checkpoint_config(),
                               trainer.config.train.keep_checkpoints)
        return str(ckpt), None
    except (OSError, SafetensorError) as err:
        kept = latest_checkpoint(trainer.run_dir)
        kept_text = f"the last complete checkpoint, {kept}, is kept" if kept else "there is no earlier checkpoint"
        return None, f"step {trainer.state.step} in '{trainer.run_dir / 'checkpoints'}' failed ({err}); {kept_text}"


def restore(trainer, ckpt: Path) -> None:
    """Put a checkpoint's weights, optimizer moments, RNG states, data position and counters back into `trainer`."""
    for name, module in trainer.modules().items():
        load_state_dict_checked(module, read_tensors(ckpt / f"{name}.safetensors"), str(ckpt))
    state = read_json(ckpt / "state.json", "training state")
    for name, optimizer in trainer.optimizers.items():
        optimizer.load_state_dict(unflatten_optimizer_state(read_tensors(ckpt / f"{name}.safetensors"), state["optimizers"][name]))
    rng = read_tensors(ckpt / "rng.safetensors")
    saved_device = state.get("device", trainer.device.type)
    if saved_device != trainer.device.type:
        raise UserError(
            f"'{ckpt}' was trained on {saved_device} and its random state cannot continue on {trainer.device.type}: "
            f"resume with --set train.device={saved_device}, or start a new run from its weights"
        )
    trainer.state.generator.set_state(rng["train_generator"])
    trainer.state.load_counters(state)
    distributed.restore_own_rng_states(rng, trainer.device, distributed.rank_seed(trainer.config.train.seed, trainer.rank) + trainer.state.step)
    saved_batch = state.get("global_batch", trainer.global_batch)
    if saved_batch != trainer.global_batch and trainer.rank == 0:
        warn(f"the global batch is now {trainer.global_batch} images (train.batch_size x grad_accumulation x {trainer.world} processes); "
             f"the run trained with {saved_batch} so far")


def save_output(what: str, path: Path, write, final: bool) -> None:
    """write() an output a recipe rewrites with each checkpoint (a LoRA file, a ControlNet folder) at `path`. A failure
    (full disk) is a warning and training goes on, as for a checkpoint; at the final save it is an error saying how to
    get the output back: --resume writes it again from the last checkpoint."""
    try:
        write()
    except (OSError, SafetensorError) as err:
        if final:
            raise UserError(f"could not write {what} {path} ({err}); free some space, then --resume writes it from the last checkpoint") from None
        warn(f"could not write {what} {path} ({err}); training goes on")
