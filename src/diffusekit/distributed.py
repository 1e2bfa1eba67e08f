"""Several training processes (torchrun): the process group and the few collectives training needs.

    torchrun --nproc_per_node 2 -m diffusekit train --preset mnist

torchrun starts one process per device and tells each its place in RANK, WORLD_SIZE and
LOCAL_RANK (plus MASTER_ADDR / MASTER_PORT for the rendezvous). `process_group` joins
them (nccl on GPUs, gloo on CPUs) and leaves again, also on errors. Without torchrun
(WORLD_SIZE unset or 1) nothing is set up and every helper here is a no-op for one
process: rank 0 of a world of 1.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from diffusekit.devices import physical_cores, pick_device

# How long a rank waits for the others in a collective before giving up. Rank 0 alone
# writes checkpoints, sample grids and evaluations while the others wait, so be generous.
TIMEOUT = datetime.timedelta(minutes=30)


def launched_world() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank as torchrun numbered it, whether or not the process group is up."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def processes_per_node() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def one_machine_env(rank_: int, world_: int, port: int) -> dict[str, str]:
    """The variables torchrun sets for a process on one machine, for processes started otherwise (tests, benchmarks)."""
    return {"RANK": str(rank_), "WORLD_SIZE": str(world_), "LOCAL_RANK": str(rank_), "LOCAL_WORLD_SIZE": str(world_),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the one process that logs and writes files."""
    return rank() == 0


@contextlib.contextmanager
def process_group(device_name: str = "auto"):
    """Join torchrun's process group for the duration of the block (if torchrun started
    several processes and no group is up yet), and always leave it afterwards."""
    if launched_world() <= 1 or active():
        yield
        return
    device = pick_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=torch.device("cuda", local_rank()))
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    try:
        yield
        dist.barrier()  # leave together: a rank that tears down its gloo connections while another still holds them can abort
    finally:
        dist.destroy_process_group()


def device_of_this_rank(device: torch.device) -> torch.device:
    """With several processes, each uses the GPU numbered by its local rank."""
    if device.type == "cuda" and world() > 1:
        return torch.device("cuda", local_rank())
    return device


def thread_share(threads: int) -> int:
    """CPU threads for this process: as asked, else (0) the node's cores shared among its processes."""
    if threads > 0 or world() <= 1:
        return threads
    return max(1, physical_cores() // processes_per_node())


def draw_for_global_batch(draw, per_rank: int, rank_: int, world_: int):
    """draw(count) for the whole global batch of per_rank x world_ rows, and this rank's rows of it:
    rank_, rank_ + world_, ... (where BatchStream puts this rank's images). So what a run draws (data
    order, timesteps, noise, flips) does not depend on how many processes share its batch."""
    return draw(per_rank * world_)[rank_::world_]


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def main_first(fn):
    """fn() on every rank, rank 0 first, then the first process of every other node, then the
    rest: whatever fn caches on disk (rendered data, encoded latents) is written by one process
    at a time, whether the nodes share a disk or not."""
    if world() <= 1:
        return fn()
    turn = 0 if rank() == 0 else 1 if local_rank() == 0 else 2
    result = None
    for phase in range(3):
        if phase == turn:
            result = fn()
        barrier()
    return result


def broadcast_from_main(value):
    """Rank 0's value (any picklable object) on every rank; the others wait for it."""
    if world() <= 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(value) -> list:
    """Every rank's value (any picklable object), in rank order, on every rank."""
    if world() <= 1:
        return [value]
    values = [None] * world()
    dist.all_gather_object(values, value)
    return values


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each number over all ranks (every rank must pass the same keys)."""
    if world() <= 1 or not values:
        return values
    stacked = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=device)
    dist.all_reduce(stacked)
    return {key: total / world() for key, total in zip(values, stacked.tolist())}


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on at least one: for decisions all ranks must agree on."""
    if world() <= 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# ----------------------------------------------------------------------------- each rank's global RNG


def rank_seed(seed: int, rank_: int) -> int:
    """The seed of a rank's global RNG (so that dropout masks differ between ranks); rank 0 keeps the run's seed."""
    return seed + 1_000_003 * rank_


def own_rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's global RNG states (dropout), named for a checkpoint that holds every rank's:
    rank 0's as a one-process run names them ('torch', 'cuda.<i>'), rank r's as 'torch.rank<r>', 'cuda.rank<r>'."""
    if rank() == 0:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        return rng
    rng = {f"torch.rank{rank()}": torch.get_rng_state()}
    if device.type == "cuda":
        rng[f"cuda.rank{rank()}"] = torch.cuda.get_rng_state(device)
    return rng


def restore_own_rng_states(rng: dict[str, torch.Tensor], device: torch.device, seed_if_missing: int) -> None:
    """Set this process's global RNG from a checkpoint's states; a rank the saved run did not have is seeded instead."""
    if rank() == 0:
        torch.set_rng_state(rng["torch"])
        devices = sorted(int(k[5:]) for k in rng if k.startswith("cuda.") and k[5:].isdigit())
        if devices and torch.cuda.is_available():  # as many GPUs as both the saved run and this machine have
            for i in devices[: torch.cuda.device_count()]:
                torch.cuda.set_rng_state(rng[f"cuda.{i}"], i)
    elif f"torch.rank{rank()}" in rng:
        torch.set_rng_state(rng[f"torch.rank{rank()}"])
        if f"cuda.rank{rank()}" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng[f"cuda.rank{rank()}"], device)
    else:
        torch.manual_seed(seed_if_missing)
