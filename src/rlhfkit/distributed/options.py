"""The Ray launcher's options (``--ray`` ...) and the checks a Ray run makes before any actor starts.

An online trainer's config gains them through :func:`with_ray_options`: the trainers know nothing of Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..engine import arg
from ..errors import ConfigError

__all__ = ["PLACEMENTS", "RayOptions", "check_ray_config", "with_ray_options"]

PLACEMENTS = ("colocated", "per_role")


@dataclass
class RayOptions:
    """Where and how a Ray run places its actor groups (a mixin of the online trainers' configs)."""

    # Ray (extra 'distributed'): one actor group per role
    ray: bool = arg(False, "Run on Ray (pip install 'rlhfkit[distributed]'): the policy and critic train in "
                    "their own actor groups (DDP inside a group, as under accelerate launch), the reference "
                    "and reward model score in inference groups, rollout workers sample and get the policy's "
                    "weights by a collective broadcast (gloo/NCCL) after every update. --prompts-per-step is "
                    "per policy worker.")
    ray_address: str | None = arg(None, "Ray cluster to join (e.g. auto or ray://host:10001); default: the one "
                                  "this process already started, else a new local one.")
    ray_placement: str = arg("per_role", "Where the actors go: colocated (one placement group; rank i of every "
                             "role runs in actor i, sharing its process, CPUs and GPU, and a rollout worker beside "
                             "a policy rank copies its weights in place; needs as many critic as policy workers) "
                             "or per_role (one placement group per role, an actor and a bundle per rank).")
    ray_policy_workers: int = arg(1, "Policy training workers (data parallel inside the group).")
    ray_critic_workers: int = arg(1, "Critic training workers (PPO with GAE only).")
    ray_ref_workers: int = arg(1, "Reference-model inference workers.")
    ray_reward_workers: int = arg(1, "Reward inference workers (each holds the whole reward source).")
    ray_rollout_workers: int = arg(1, "Rollout (sampling) workers.")
    ray_cpus_per_worker: float = arg(1.0, "CPUs of one placement bundle, i.e. of one actor (colocated: shared "
                                     "by the roles of one rank). Fractions are allowed.")
    ray_use_gpu: bool = arg(False, "One GPU per bundle (colocated roles share it); NCCL for the weight "
                            "broadcast.")
    ray_timeout_s: float = arg(600.0, "Longest wait for one worker call or collective; a worker "
                               "that dies or hangs ends the run with an error naming it, not a hang.")
    ray_startup_timeout_s: float = arg(1800.0, "Longest wait for the Ray workers to be placed, start and load "
                                       "their models.")
    ray_check_sync: bool = arg(False, "After every weight sync, compare a checksum of every policy tensor "
                               "on each rollout worker with policy rank 0 (an error when one differs).")

    def __reduce__(self):
        # a class made by with_ray_options is found again through it (plain pickle cannot look it up by name)
        base = getattr(type(self), "_ray_options_of", None)
        if base is None:
            return object.__reduce__(self)
        return _rebuild, (base, dict(self.__dict__))


_WITH_RAY: dict[type, type] = {}


def with_ray_options(config_cls: type) -> type:
    """``config_cls`` plus the :class:`RayOptions` fields (after its own, so ``--help`` lists them last): a
    dataclass subclassing both, with ``config_cls``'s name, docstring and ``algorithm``. One class per
    ``config_cls`` (cached), so configs built twice are of the same type."""
    if issubclass(config_cls, RayOptions):
        return config_cls
    if config_cls not in _WITH_RAY:
        namespace = {"__doc__": config_cls.__doc__, "__module__": config_cls.__module__,
                     "__qualname__": config_cls.__qualname__, "_ray_options_of": config_cls}
        if hasattr(config_cls, "algorithm"):
            namespace["algorithm"] = config_cls.algorithm
        cls = dataclass(type(config_cls.__name__, (RayOptions, config_cls), namespace))
        cls.__doc__ = config_cls.__doc__
        _WITH_RAY[config_cls] = cls
    return _WITH_RAY[config_cls]


def _rebuild(base: type, state: dict[str, Any]) -> Any:
    config = object.__new__(with_ray_options(base))
    config.__dict__.update(state)
    return config


def check_ray_config(config: Any) -> None:
    """One-line ConfigErrors for settings a Ray run cannot honour (checked before any actor starts)."""
    if config.ray_placement not in PLACEMENTS:
        raise ConfigError(f"--ray-placement must be one of {', '.join(PLACEMENTS)}, not '{config.ray_placement}'")
    for role in ("policy", "critic", "ref", "reward", "rollout"):
        if getattr(config, f"ray_{role}_workers") < 1:
            raise ConfigError(f"--ray-{role}-workers must be >= 1")
    if min(config.ray_cpus_per_worker, config.ray_timeout_s, config.ray_startup_timeout_s) <= 0:
        raise ConfigError("--ray-cpus-per-worker, --ray-timeout-s and --ray-startup-timeout-s must be > 0")
    unsupported = {"lora_r": "LoRA", "eval_dataset": "--eval-dataset", "heldout_judge": "--heldout-judge",
                   "report_to": "--report-to", "dynamic_sampling": "--dynamic-sampling", "tis_cap": "--tis-cap",
                   "tools": "--tools", "env": "--env"}  # the rollout workers generate without tool or env episodes
    for name, what in unsupported.items():
        if getattr(config, name) and getattr(config, name) != "none":
            raise ConfigError(f"{what} is not supported with --ray yet (run without --ray, or evaluate the saved "
                              "policy with `rlhfkit eval`)")
    prompts = config.prompts_per_step * config.ray_policy_workers
    for role in ("rollout", "reward", "ref"):
        if getattr(config, f"ray_{role}_workers") > prompts:
            raise ConfigError(f"--ray-{role}-workers ({getattr(config, f'ray_{role}_workers')}) is more than the "
                              f"{prompts} prompts of a step: some workers would get nothing")
    if config.ray_placement == "colocated" and config.advantage == "gae" and \
            config.ray_critic_workers != config.ray_policy_workers:
        raise ConfigError("--ray-placement colocated runs policy rank i and critic rank i in one process (one "
                          "data-parallel group): --ray-critic-workers must equal --ray-policy-workers")
    sequences = prompts * config.num_generations
    if config.advantage == "gae" and sequences // config.ray_critic_workers < config.num_minibatches:
        raise ConfigError(f"--ray-critic-workers {config.ray_critic_workers}: each critic worker needs at least "
                          f"--num-minibatches ({config.num_minibatches}) of the {sequences} sequences of a step")
