"""Few-step students: a diffusion model distilled to 1-4 network calls, trained by the same trainer.

    distill("runs/mnist", "runs/mnist-fast", method="progressive", steps=4, budget="20m")
    diffusekit distill runs/mnist --method consistency --out runs/mnist-cm --steps 4 --budget 20m

The student starts as the teacher's EMA weights; the frozen teacher runs in the loop. The loop, EMA,
budgets, checkpoints and the bit-exact resume are trainer.Trainer's; the data and conditions are
diffusion_batches.py's (as `train`'s); the losses are distill_losses.py, composed in DistillRecipe.loss.

progressive (Salimans & Ho 2022, Algorithm 2): stage by stage, a student of N DDIM steps learns
what two steps of its teacher (2N steps) do; then it becomes the teacher of the next stage, from
distill.start_steps down to --steps (a power of two). The student predicts what the teacher does
(eps, x0 or v) and samples with DDIM at its N trailing timesteps (trailing: the first step starts
from the noisiest timestep, so even a 1-step student sees pure noise).

consistency: consistency distillation (Song et al. 2023, Algorithm 2, LCM's form), rather than ECT's
consistency tuning (Geng et al. 2024), because a CPU budget allows a few thousand steps: CD's
target comes from one ODE step of the teacher, which is exact up to the solver's error from the
first step on, whereas consistency training / tuning estimates the ODE from a single noise draw
and needs its step size annealed over a long run; CD also carries classifier-free guidance over
for free (the teacher's guided ODE, as LCM). The student samples at any step count (multistep
consistency sampling, samplers.sample_consistency).

Guidance distillation (Meng et al. 2023): a class- or text-conditional teacher gets a student with
a guidance-scale embedding (model.guidance_embedding, zero at first, so the student starts as the
teacher) that learns the guided teacher at w ~ U[distill.guidance_min, guidance_max]: progressive
distillation first trains that (their stage one, at start_steps), consistency distillation
uses the guided teacher in its ODE step. One call per step then replaces guidance's two.

Every checkpoint keeps the current teacher's weights (teacher.safetensors; for consistency also
the target network, target.safetensors): a resume needs nothing outside the run, at the cost of
the teacher's size on disk per checkpoint (`diffusekit slim` drops both). A progressive run keeps the
students of its earlier stages in RUN/students/N-steps/.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from diffusekit import distributed
from diffusekit.config import Config, apply_overrides, config_from_dict, config_to_dict
from diffusekit.denoiser import ConsistencyDenoiser, Denoiser
from diffusekit.devices import pick_device, prepare_module, use_all_cores
from diffusekit.diffusion_batches import DiffusionBatches
from diffusekit.diffusion_training import images_or_latents
from diffusekit.distill_losses import consistency_loss, progressive_target, x0_loss
from diffusekit.durations import parse_duration
from diffusekit.errors import UserError, warn
from diffusekit.files import read_json, read_tensors
from diffusekit.guidance import GuidedDenoiser
from diffusekit.io.checkpoint import latest_checkpoint, load_config, load_weights, resolve_checkpoint, write_sampling_checkpoint
from diffusekit.io.runs import check_run_request
from diffusekit.layout import choose_layout
from diffusekit.losses import draw_sigma_and_noise
from diffusekit.models import build_net, example_inputs
from diffusekit.nn.state import load_state_dict_checked
from diffusekit.optim import ema_update
from diffusekit.schedule import make_schedule
from diffusekit.sigmas import append_dims, ddim_step
from diffusekit.trainer import Recipe, Trained, TrainResult, run_training

METHODS = ("progressive", "consistency")
GUIDANCE_EMBEDDING = 256  # LCM's width of the guidance-scale embedding (diffusers' time_cond_proj_dim)
LR_FACTOR = 0.2  # the student's learning rate: a fifth of the teacher's (it starts trained)
DEFAULT_BUDGET = "20m"
BUDGET_SHARE = 0.8  # of the budget the measured steps may fill (data, EMA, logs and checkpoints take the rest)


@dataclass(frozen=True)
class Stage:
    kind: str  # "guidance" (Meng et al.'s stage one), "halve" (progressive) or "consistency"
    student_steps: int  # what the stage's student samples with
    teacher_calls: int  # network calls of the teacher per training step (guidance doubles them)


def stages(config: Config) -> list[Stage]:
    """The stages a distillation run goes through, in order."""
    d, guided = config.distill, bool(config.model.guidance_embedding)
    if d.method == "consistency":
        return [Stage("consistency", d.steps, 2 if guided else 1)]
    halvings = []
    n = d.start_steps // 2
    while n >= d.steps:
        halvings.append(Stage("halve", n, 2))
        n //= 2
    return ([Stage("guidance", d.start_steps, 2)] if guided else []) + halvings


def teacher_checkpoint(path: str | Path) -> tuple[Path, Config]:
    """The teacher's checkpoint and config; one clear message for what cannot be distilled."""
    ckpt = resolve_checkpoint(path)
    config = load_config(ckpt)
    if config.task != "diffusion":
        raise UserError(f"'{path}' holds an {config.task} (a train-vae run), not a diffusion model: distill a diffusion run "
                        "(`diffusekit train`; a latent one carries this autoencoder)")
    if config.distill.method:
        raise UserError(f"'{path}' is already a {config.distill.method} student of '{config.distill.teacher}': distill that teacher, "
                        f"or continue this run with `diffusekit distill --resume --out {path}`")
    return ckpt, config


def student_config(teacher: Path, config: Config, method: str, steps: int, step: int | None) -> Config:
    """The teacher's config made into its student's: the distill record, the guidance embedding of a conditional
    model, sampling defaults at the student's steps, a fifth of the learning rate, no warm-up."""
    if method not in METHODS:
        raise UserError(f"unknown distillation method '{method}'; use one of: {', '.join(METHODS)}")
    guided = bool(config.model.num_classes or config.text.encoder)
    sampler = "consistency" if method == "consistency" else "ddim"
    return replace(
        config,
        description=f"{method} distillation of {teacher} to {steps} step(s)",
        model=replace(config.model, guidance_embedding=GUIDANCE_EMBEDDING if guided else 0),
        distill=replace(config.distill, method=method, teacher=str(teacher), teacher_step=step or 0, steps=steps),
        sample=replace(config.sample, sampler=sampler, steps=steps, spacing="trailing", steps_offset=0, eta=0.0),
        eval=replace(config.eval, sampler=sampler, steps=steps, every=0),
        train=replace(config.train, lr=config.train.lr * LR_FACTOR, warmup_steps=0, budget="", sample_every=0),
    )


def distill(teacher: str | Path | None, out: str | Path, *, method: str | None = None, steps: int | None = None, budget: str | None = None,
            train_steps: int | None = None, overrides: list[str] | tuple = (), resume: bool = False, overwrite: bool = False,
            progress: bool = True) -> TrainResult:
    """Distill `teacher` into a few-step student in the run folder `out` (or --resume the distillation there).

    train_steps: optimizer steps in all (split evenly over progressive's stages); without them the budget
    (default 20 minutes) is filled: a few timed steps say how many fit, and the run's config records them."""
    out = Path(out)
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise UserError(f"nothing to resume in '{out}': it has no complete checkpoint; drop --resume to start a distillation there")
        config = run_config(load_config(ckpt))
    else:
        if teacher is None:
            raise UserError("distill needs the teacher: a trained run or checkpoint, e.g. `diffusekit distill runs/mnist --out runs/mnist-fast`")
        ckpt, teacher_config = teacher_checkpoint(teacher)
        state = read_json(ckpt / "state.json", "training state")
        config = student_config(ckpt, teacher_config, method or "progressive", steps or 4, state.get("step"))
    timed = budget or not (resume or train_steps or any(o.startswith(("distill.stage_steps", "train.max_steps")) for o in overrides))
    config = apply_overrides(config, list(overrides), {
        "distill.method": method if resume else None, "distill.steps": steps if resume else None,
        "train.max_steps": train_steps if resume and train_steps else None,  # the new total (a progressive run trains its last stage on)
        "train.budget": (budget or DEFAULT_BUDGET) if timed else None,
    })
    check_run_request(out, config, resume, overwrite)  # before the timing below: --out is not the teacher, the flags agree
    if not resume and config.diffusion.prediction == "eps":
        warn("the teacher predicts eps, and so will its student: at few steps an eps student's x0 = (x - sigma eps) blows up its "
             "errors at high noise (Salimans & Ho 2022, sec. 4); a teacher trained with diffusion.prediction=v (the presets) distils better")
    if not resume:
        config = with_stage_steps(config, train_steps)
    result = run_training(DistillRecipe, config, out, resume=resume, overwrite=overwrite, progress=progress)
    trained = load_config(result.checkpoint).distill.trained_steps
    if trained != config.distill.steps and distributed.launched_rank() == 0:
        warn(f"the {result.stopped_by} ran out before the last stage: this student samples with {trained} steps (its checkpoint says so); "
             f"`diffusekit distill --resume --out {out} --budget ...` trains on to {config.distill.steps}")
    return result


def run_config(checkpoint_config: Config) -> Config:
    """A run's config from one of its checkpoints' (which record their student's steps as the sampling defaults)."""
    d = checkpoint_config.distill
    steps = {"steps": d.steps} if d.method == "progressive" else {}
    return replace(checkpoint_config, distill=replace(d, trained_steps=0), sample=replace(checkpoint_config.sample, **steps),
                   eval=replace(checkpoint_config.eval, **steps))


def with_stage_steps(config: Config, train_steps: int | None) -> Config:
    """distill.stage_steps (given, train_steps split over the stages, or measured to fill the budget) and the
    train.max_steps they add up to."""
    d, count = config.distill, len(stages(config))
    per_stage = d.stage_steps or (max(1, train_steps // count) if train_steps else 0)
    if not per_stage and config.train.budget:
        if distributed.launched_world() > 1:
            raise UserError("under torchrun, distill needs --train-steps (the budget is measured in one process, and every process must agree)")
        per_stage = measured_stage_steps(config, parse_duration(config.train.budget))
    if not per_stage:
        per_stage = max(1, config.train.max_steps // count)
    return replace(config, distill=replace(d, stage_steps=per_stage), train=replace(config.train, max_steps=per_stage * count))


def measured_stage_steps(config: Config, budget_s: float, repeats: int = 3) -> int:
    """How many optimizer steps per stage fit BUDGET_SHARE of the budget: a teacher call and a student step
    (forward and backward) are timed on a batch of the run's shape, and each stage costs its calls."""
    device = pick_device(config.train.device)
    use_all_cores(config.train.threads)
    net = prepare_module(build_net(config), device)
    x, t, cond = example_inputs(config, config.train.batch_size * config.train.grad_accumulation, device)

    def timed(fn) -> float:
        fn()  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with torch.no_grad():
            teacher_call = timed(lambda: net(x, t, **cond))
        student_step = timed(lambda: net(x, t, **cond).square().mean().backward())
    seconds = sum(stage.teacher_calls * teacher_call + student_step for stage in stages(config))
    return max(1, int(BUDGET_SHARE * budget_s / seconds))


class DistillRecipe(Recipe):
    """A student learns from a frozen teacher: the diffusion run's data and conditions (DiffusionBatches), the
    student as what trains, the teacher (and consistency's target network) in every checkpoint."""

    def load_data(self):
        source = self.trainer.resume_from or Path(self.trainer.config.distill.teacher)  # the autoencoder the teacher was trained with
        dataset, self.vae = images_or_latents(self.trainer, lambda: (read_tensors(source / "vae.safetensors"), str(source)))
        return dataset

    def build(self) -> Trained:
        t = self.trainer
        d = t.config.distill
        if d.method not in METHODS or d.stage_steps < 1:
            raise UserError(f"distill.method = {d.method!r} and distill.stage_steps = {d.stage_steps}: a distillation run needs a method and its "
                            "steps per stage (distill.distill() works them out)")
        self.schedule = make_schedule(t.config.diffusion)
        self.batches = DiffusionBatches(t, self.vae)
        self.batches.use_captions()
        student = build_net(t.config)  # the teacher's network, its guidance embedding (if any) at zero
        self.stage_list, self.guided = stages(t.config), bool(t.config.model.guidance_embedding)
        if t.resume_from is None:  # on resume every module comes from the checkpoint
            weights = load_weights(Path(d.teacher), "ema")
            load_state_dict_checked(student, {**student.state_dict(), **weights}, d.teacher)  # all but the new embedding
        self.teacher = prepare_module(copy.deepcopy(student), t.device).requires_grad_(False).eval()  # with the embedding at zero: the teacher exactly
        student = prepare_module(student, t.device)
        choose_layout(student, example_inputs(t.config, t.config.train.batch_size, t.device), training=True, autocast_dtype=t.autocast_dtype)
        saved = {"vae": self.vae} if self.vae is not None else {}
        saved["teacher"] = self.teacher
        if d.method == "consistency":
            self.target = saved["target"] = copy.deepcopy(self.teacher)
        return Trained(student, saved=saved)

    # ------------------------------------------------------------------ stages

    def stage_index(self, step: int) -> int:
        return min(step // self.trainer.config.distill.stage_steps, len(self.stage_list) - 1)

    def ema_age(self, step: int) -> int:
        """Each progressive stage restarts the EMA's warm-up: its EMA is of this stage's student alone."""
        return step - self.stage_index(step) * self.trainer.config.distill.stage_steps

    def begin_stage(self) -> None:
        """At a stage's first step the last stage's student (its EMA) becomes the teacher, and the new student starts
        as it (Salimans & Ho's Algorithm 2: theta <- eta), with fresh optimizer moments, so every stage trains as the first."""
        t = self.trainer
        step, per_stage = t.state.step, t.config.distill.stage_steps
        if step == 0 or step % per_stage or step // per_stage >= len(self.stage_list):
            return
        weights = t.ema.state_dict()
        self.teacher.load_state_dict(weights)
        t.net.load_state_dict(weights)
        for optimizer in t.optimizers.values():
            optimizer.state.clear()

    def trained_steps(self) -> int:
        """What the student of the last finished step samples with."""
        return self.stage_list[self.stage_index(max(self.trainer.state.step - 1, 0))].student_steps

    def checkpoint_config(self) -> dict:
        """The run's config with the checkpoint's student's steps as its sampling and evaluation defaults."""
        values, n = config_to_dict(self.trainer.config), self.trained_steps()
        values["distill"]["trained_steps"] = n
        if self.trainer.config.distill.method == "progressive":
            values["sample"]["steps"] = values["eval"]["steps"] = n
        return values

    # ------------------------------------------------------------------ one step

    def draws(self, x0: torch.Tensor, stage: Stage) -> dict[str, torch.Tensor]:
        """Everything random in a step, drawn for the whole batch before it is split into micro-batches."""
        t = self.trainer
        if stage.kind == "guidance":
            sigma, noise = draw_sigma_and_noise(self.schedule, x0, t.generator, t.rank, t.world)
            out = {"sigma": sigma, "noise": noise}
        else:
            intervals = stage.student_steps if stage.kind == "halve" else t.config.distill.solver_steps
            out = {"interval": (self.batches.uniform(len(x0)) * intervals).long().clamp(max=intervals - 1), "noise": self.batches.normal(x0)}
        if self.guided:
            d = t.config.distill
            out["w"] = d.guidance_min + (d.guidance_max - d.guidance_min) * self.batches.uniform(len(x0))
        return out

    def train_step(self) -> dict[str, float]:
        t = self.trainer
        self.begin_stage()
        stage = self.stage_list[self.stage_index(t.state.step)]
        x0, cond, _ = self.batches.next_batch()  # distillation weighs every item alike
        draws = self.draws(x0, stage)
        loss = t.backward_micro_batches(cond, lambda part, part_cond: self.loss(stage, x0[part], part_cond, {k: v[part] for k, v in draws.items()}))
        stepped = t.optimizer_step()
        if stepped and stage.kind == "consistency":
            ema_update(self.target, t.net, t.config.distill.target_ema)
        t.finish_step(len(x0), stepped=stepped)
        self.finish_stage()
        return {"loss": loss, "student_steps": stage.student_steps}

    def finish_stage(self) -> None:
        """After a progressive stage but the last: a checkpoint, and its student kept in RUN/students/N-steps/ (what
        `diffusekit slim` writes: it samples alone), so a run to 1 step leaves its 4- and 2-step students too."""
        t = self.trainer
        per_stage = t.config.distill.stage_steps
        if t.config.distill.method != "progressive" or t.state.step % per_stage or t.state.step // per_stage >= len(self.stage_list):
            return
        ckpt = t.save()
        if ckpt is not None and t.rank == 0:
            out = t.run_dir / "students" / f"{self.trained_steps()}-steps"
            shutil.rmtree(out, ignore_errors=True)  # a stage trained again after a resume from before its end
            write_sampling_checkpoint(ckpt, out)

    def loss(self, stage: Stage, x0: torch.Tensor, cond: dict | None, draws: dict) -> torch.Tensor:
        prediction = self.trainer.config.diffusion.prediction
        student, teacher = Denoiser(self.trainer.train_net, self.schedule, prediction), Denoiser(self.teacher, self.schedule, prediction)
        with_w = {**(cond or {}), "guidance": draws["w"]} if self.guided else cond
        if stage.kind == "guidance":  # Meng et al. stage one: the guided teacher's x0_hat at w, in one call
            sigma = draws["sigma"]
            x = x0 + append_dims(sigma, x0) * draws["noise"]
            with torch.no_grad():
                target = GuidedDenoiser(teacher, self.batches.null_condition(cond, len(x0)), draws["w"])(x, sigma, cond)
            return x0_loss(student(x, sigma, with_w), target, sigma)
        if stage.kind == "halve":  # the teacher walks the 2N-step grid, the student the N-step one inside it
            grid = self.schedule.sampling_sigmas(2 * stage.student_steps, "trailing").to(x0.device)
            i = draws["interval"]
            sigma, sigma_mid, sigma_next = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
            x = x0 + append_dims(sigma, x0) * draws["noise"]
            target = progressive_target(teacher, x, sigma, sigma_mid, sigma_next, with_w)
            return x0_loss(student(x, sigma, with_w), target, sigma)
        grid = self.consistency_grid().to(x0.device)
        n = draws["interval"]
        sigma, sigma_next = grid[n], grid[n + 1]
        x = x0 + append_dims(sigma, x0) * draws["noise"]
        with torch.no_grad():
            solver = GuidedDenoiser(teacher, self.batches.null_condition(cond, len(x0)), draws["w"]) if self.guided and cond else teacher
            x_next = ddim_step(x, solver(x, sigma, cond), sigma, sigma_next)  # the teacher's ODE step
            target = ConsistencyDenoiser(Denoiser(self.target, self.schedule, prediction), self.schedule)(x_next, sigma_next, with_w)
        prediction_f = ConsistencyDenoiser(student, self.schedule)(x, sigma, with_w)
        return consistency_loss(prediction_f, target, self.trainer.config.distill.loss)

    def consistency_grid(self) -> torch.Tensor:
        """The N + 1 decreasing noise levels of the teacher's ODE: N trailing timesteps, then sigma_min (t = 0), where f(x) = x."""
        timesteps = self.schedule.timesteps(self.trainer.config.distill.solver_steps, "trailing")
        sigmas = self.schedule.sigmas[timesteps]
        return torch.cat([sigmas, sigmas.new_full((1,), self.schedule.sigma_min)])

    def pipeline(self):
        """The EMA student as a pipeline, with the checkpoint's sampling defaults (progressive: this stage's steps)."""
        return self.batches.pipeline(self.trainer.ema, config_from_dict(self.checkpoint_config(), "the distillation run"))

    def sample_grid(self) -> Path:
        return self.batches.sample_grid(self.pipeline())

    def evaluate(self) -> dict:
        return self.batches.evaluate(self.pipeline())
