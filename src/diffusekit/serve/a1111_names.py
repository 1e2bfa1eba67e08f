"""AUTOMATIC1111's sampler and scheduler names, mapped to diffusekit's samplers (samplers.SAMPLERS) and step
spacings (schedule.SPACINGS), for /sdapi/v1. A name A1111 has and diffusekit has not is either mapped to the
closest sampler diffusekit has (said in the answer's notes) or refused with the list of names that work.

A1111 >= 1.9 sends the scheduler apart ("DPM++ 2M" + scheduler "Karras"); older clients put it in the name
("DPM++ 2M Karras"). As in A1111, a scheduler in the name wins over the `scheduler` field.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusekit.samplers import SAMPLERS
from diffusekit.schedule import SPACINGS
from diffusekit.serve.requests import RequestError


@dataclass(frozen=True)
class A1111Sampler:
    name: str
    aliases: tuple[str, ...]
    ours: str  # the diffusekit sampler that runs
    exact: bool  # the same algorithm; False: the closest diffusekit has


A1111_SAMPLERS = [
    A1111Sampler("DPM++ 2M", ("k_dpmpp_2m",), "dpmpp_2m", True),
    A1111Sampler("DPM++ SDE", ("k_dpmpp_sde",), "dpmpp_2m_sde", False),  # A1111's is the single-step 2S SDE
    A1111Sampler("DPM++ 2M SDE", ("k_dpmpp_2m_sde",), "dpmpp_2m_sde", True),
    A1111Sampler("DPM++ 2M SDE Heun", ("k_dpmpp_2m_sde_heun",), "dpmpp_2m_sde", False),
    A1111Sampler("DPM++ 3M SDE", ("k_dpmpp_3m_sde",), "dpmpp_3m", False),  # diffusekit's 3M is the ODE solver
    A1111Sampler("Euler a", ("k_euler_a", "k_euler_ancestral"), "euler_ancestral", True),
    A1111Sampler("Euler", ("k_euler",), "euler", True),
    A1111Sampler("Heun", ("k_heun",), "heun", True),
    A1111Sampler("DPM2", ("k_dpm_2",), "heun", False),  # also second order, two network calls a step
    A1111Sampler("DPM2 a", ("k_dpm_2_a",), "euler_ancestral", False),
    A1111Sampler("DDIM", ("ddim",), "ddim", True),
    A1111Sampler("DDPM", ("ddpm",), "ddpm", True),
    A1111Sampler("UniPC", ("unipc",), "unipc", True),
    A1111Sampler("LCM", ("k_lcm",), "consistency", True),  # multistep consistency sampling: denoise, noise again
]
_COVERED = {s.ours for s in A1111_SAMPLERS if s.exact}
# diffusekit's own names work too; the samplers A1111 has no name for are listed under their own
ALL_SAMPLERS = A1111_SAMPLERS + [A1111Sampler(name, (), name, True) for name in SAMPLERS if name not in _COVERED]


@dataclass(frozen=True)
class A1111Scheduler:
    name: str
    label: str
    spacing: str | None  # None: the model's own spacing


A1111_SCHEDULERS = [
    A1111Scheduler("automatic", "Automatic", None),
    A1111Scheduler("uniform", "Uniform", "linspace"),  # k-diffusion's get_sigmas: timesteps evenly from T-1 to 0
    A1111Scheduler("karras", "Karras", "karras"),
    A1111Scheduler("exponential", "Exponential", "logsnr"),  # evenly in log sigma, i.e. in log-SNR
    A1111Scheduler("sgm_uniform", "SGM Uniform", "trailing"),
    A1111Scheduler("simple", "Simple", "trailing"),
    A1111Scheduler("normal", "Normal", "linspace"),
    A1111Scheduler("ddim", "DDIM", "leading"),
]
ALL_SCHEDULERS = A1111_SCHEDULERS + [A1111Scheduler(s, s, s) for s in SPACINGS if s not in {x.name for x in A1111_SCHEDULERS}]


def aliases(sampler: A1111Sampler) -> list[str]:
    """A1111's aliases of a sampler and, where it is the same algorithm, diffusekit's name ("DPM++ 2M": k_dpmpp_2m, dpmpp_2m)."""
    own = [sampler.ours] if sampler.exact and sampler.ours not in (sampler.name.lower(), *sampler.aliases) else []
    return [*sampler.aliases, *own]


def _find_scheduler(text: str) -> A1111Scheduler | None:
    key = text.strip().lower()
    return next((s for s in ALL_SCHEDULERS if key in (s.name, s.label.lower())), None)


def _split_scheduler(name: str) -> tuple[str, A1111Scheduler | None]:
    """("DPM++ 2M", Karras) for "DPM++ 2M Karras"; (name, None) when it ends in no scheduler."""
    suffixes = sorted(((suffix, s) for s in ALL_SCHEDULERS[1:] for suffix in (s.label, s.name)), key=lambda pair: -len(pair[0]))
    for suffix, scheduler in suffixes:  # the longest first: "SGM Uniform" before "Uniform"
        if name.lower().endswith(" " + suffix.lower()):
            return name[: -len(suffix) - 1], scheduler
    return name, None


def a1111_name(ours: str) -> str:
    """What A1111 calls the diffusekit sampler `ours` ("dpmpp_2m" -> "DPM++ 2M"); its own name where A1111 has none."""
    return next(s.name for s in ALL_SAMPLERS if s.ours == ours and s.exact)


@dataclass(frozen=True)
class SamplerChoice:
    sampler: A1111Sampler | None  # None: the model's own sampler
    scheduler: A1111Scheduler
    notes: tuple[str, ...] = ()


def resolve(sampler_name: str | None, scheduler: str | None) -> SamplerChoice:
    """The diffusekit sampler and spacing for A1111's sampler_name and scheduler; RequestError naming the field
    for a name that is not in the tables (GET /sdapi/v1/samplers and /schedulers list them)."""
    chosen = _find_scheduler(scheduler) if scheduler else A1111_SCHEDULERS[0]
    if chosen is None:
        names = ", ".join(s.label for s in ALL_SCHEDULERS)
        raise RequestError(f"unknown scheduler '{scheduler[:60]}'; this server has: {names} (GET /sdapi/v1/schedulers)", "scheduler")
    if not sampler_name:
        return SamplerChoice(None, chosen)
    name, in_name = _split_scheduler(sampler_name.strip())
    chosen = in_name or chosen  # "DPM++ 2M Karras": a scheduler in the name wins, as in A1111
    key = name.lower()
    found = next((s for s in ALL_SAMPLERS if key == s.name.lower() or key in aliases(s)), None)
    if found is None:
        names = ", ".join(s.name for s in ALL_SAMPLERS)
        raise RequestError(f"unknown sampler_name '{sampler_name[:60]}'; this server has: {names} (each may end in a scheduler, "
                           "e.g. \"DPM++ 2M Karras\"; GET /sdapi/v1/samplers)", "sampler_name")
    notes = () if found.exact else (f"sampler_name '{found.name}' ran as diffusekit's {found.ours}, the closest sampler it has",)
    return SamplerChoice(found, chosen, notes)


def samplers_list() -> list[dict]:
    """GET /sdapi/v1/samplers: A1111's {name, aliases, options}, options saying what runs."""
    return [{"name": s.name, "aliases": aliases(s), "options": {"diffusekit_sampler": s.ours, **({} if s.exact else {"closest": "true"})}}
            for s in ALL_SAMPLERS]


def schedulers_list() -> list[dict]:
    """GET /sdapi/v1/schedulers: A1111's {name, label, aliases, default_rho, need_inner_model}, with the spacing that runs."""
    return [{"name": s.name, "label": s.label, "aliases": None, "default_rho": 7.0 if s.spacing == "karras" else -1, "need_inner_model": False,
             "diffusekit_schedule": s.spacing} for s in ALL_SCHEDULERS]
