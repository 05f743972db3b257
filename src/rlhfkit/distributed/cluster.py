"""The actors of a Ray run and the driver's bounded calls to them: where every (role, rank) is placed, the
Ray actor (:class:`RoleHost`) that hosts one or several role workers, and :class:`RayCluster`, whose every
wait ends in a result or a :class:`WorkerFailure` naming the worker.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..engine import TrainingError
from ..errors import ConfigError
from ..trainers.rl import RLConfig
from .workers import WORKER_CLASSES

TRAINING_ROLES = ("policy", "critic")


def import_ray():
    """``ray``, or a ConfigError naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'rlhfkit[distributed]'") from None
    return ray


def roles_of(config: RLConfig) -> dict[str, int]:
    """Worker count of every role of this run (no critic group without GAE)."""
    counts = {"policy": config.ray_policy_workers, "critic": config.ray_critic_workers,
              "reference": config.ray_ref_workers, "reward": config.ray_reward_workers,
              "rollout": config.ray_rollout_workers}
    if config.advantage != "gae":
        del counts["critic"]
    return counts


def placement_plan(counts: dict[str, int], placement: str,
                   cpus: float, use_gpu: bool) -> tuple[list[list[dict[str, float]]], list[tuple[int, int, list]]]:
    """Placement groups (lists of bundles) and the actors: (group, bundle, [(role, rank), ...]) for each.

    colocated: one group of max(counts) bundles; actor i hosts rank i of every role (roles share the process,
    its CPUs and GPU, and a rollout worker copies its co-hosted policy rank's weights). per_role: one group per
    role, one actor per rank, each in a bundle of its own.
    """
    bundle = {"CPU": float(cpus), **({"GPU": 1.0} if use_gpu else {})}
    if placement == "colocated":
        width = max(counts.values())
        hosts = [(0, i, [(role, i) for role, n in counts.items() if n > i]) for i in range(width)]
        return [[dict(bundle) for _ in range(width)]], hosts
    groups, hosts = [], []
    for role, n in counts.items():
        hosts += [(len(groups), rank, [(role, rank)]) for rank in range(n)]
        groups.append([dict(bundle) for _ in range(n)])
    return groups, hosts


def _resources(resources: dict[str, float]) -> str:
    return ", ".join(f"{resources.get(kind, 0):g} {kind}s" for kind in ("CPU", "GPU"))



class RoleHost:
    """One Ray actor (one process) hosting one or more role workers (several when colocated)."""

    def __init__(self, config: RLConfig, roles: list[tuple[str, int]]):
        self.workers = {(role, rank): WORKER_CLASSES[role](config, role, rank) for role, rank in roles}

    def run(self, role: str, rank: int, method: str, *args: Any) -> Any:
        """``method(*args)`` of the hosted worker (role, rank)."""
        return getattr(self.workers[role, rank], method)(*args)

    def info(self) -> dict[str, Any]:
        return next(iter(self.workers.values())).info()

    def copy_policy(self, policy_rank: int, rollout_rank: int) -> float:
        """The weight sync of a rollout worker that shares this process with a policy rank: a local copy (every
        policy rank holds the same weights). Returns the seconds it took."""
        t0 = time.perf_counter()
        source = self.workers["policy", policy_rank]._weights_module()
        target = self.workers["rollout", rollout_rank]._weights_module()
        with torch.no_grad():
            for (name, a), (other, b) in zip(source.named_parameters(), target.named_parameters(), strict=True):
                if name != other or a.shape != b.shape:
                    raise TrainingError(f"rollout worker {rollout_rank}'s parameter {other} does not match the "
                                        f"policy's {name}")
                b.copy_(a)
        return time.perf_counter() - t0


class WorkerFailure(Exception):
    """A worker call failed: it died, hung past the timeout, or raised."""

    def __init__(self, kind: str, role: str, rank: int, phase: str, cause: BaseException | None = None,
                 others: Sequence[tuple[str, int]] = ()):
        super().__init__(f"{kind}: {role}[{rank}] in {phase}")
        self.kind, self.role, self.rank, self.phase, self.cause = kind, role, rank, phase, cause
        self.others = list(others)  # roles sharing its process (colocated): they died with it
        self.waited = 0.0  # seconds waited, for a timeout


class RayCluster:
    """The actors of one run: placement groups, the hosts of every (role, rank), bounded waits, teardown."""

    def __init__(self, config: RLConfig, ray: Any):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.config, self.ray = config, ray
        self.timeout = config.ray_timeout_s
        self.counts = roles_of(config)
        groups, plan = placement_plan(self.counts, config.ray_placement, config.ray_cpus_per_worker,
                                      config.ray_use_gpu)
        self.hosts: list[Any] = []
        self.host_roles = [roles for _, _, roles in plan]
        self.host_of = {key: i for i, roles in enumerate(self.host_roles) for key in roles}
        self.placement_groups = [placement_group(bundles, strategy="PACK") for bundles in groups]
        ready = [pg.ready() for pg in self.placement_groups]
        if len(ray.wait(ready, num_returns=len(ready), timeout=config.ray_startup_timeout_s)[0]) < len(ready):
            need = sum(b.get("CPU", 0) for g in groups for b in g)
            self.shutdown()
            raise ConfigError(f"Ray could not place the workers within {config.ray_startup_timeout_s:g}s: they "
                              f"need {need:g} CPUs"
                              f"{' and GPUs' if config.ray_use_gpu else ''} in {config.ray_placement} bundles, the "
                              f"cluster has {_resources(ray.cluster_resources())} ({_resources(ray.available_resources())}"
                              " free); lower --ray-cpus-per-worker or the --ray-*-workers counts")
        remote = ray.remote(max_restarts=0)(RoleHost)
        for group, bundle, roles in plan:
            strategy = PlacementGroupSchedulingStrategy(self.placement_groups[group],
                                                        placement_group_bundle_index=bundle)
            self.hosts.append(remote.options(num_cpus=groups[group][bundle]["CPU"],
                                             num_gpus=groups[group][bundle].get("GPU", 0),
                                             scheduling_strategy=strategy).remote(config, roles))

    def call(self, role: str, method: str, args_per_rank: Sequence[tuple] | None = None, phase: str = "",
             ranks: Sequence[int] | None = None) -> list:
        """Call ``method`` on ranks of ``role`` (all by default) and wait for every answer (bounded)."""
        return self.gather(self.submit(role, method, args_per_rank, ranks), phase or method)

    def submit(self, role: str, method: str, args_per_rank: Sequence[tuple] | None = None,
               ranks: Sequence[int] | None = None) -> list[tuple[Any, str, int]]:
        """Start ``method`` on ranks of ``role``; an actor runs its calls in the order they were submitted."""
        ranks = list(range(self.counts[role])) if ranks is None else list(ranks)
        args_per_rank = args_per_rank or [()] * len(ranks)
        return [(self.hosts[self.host_of[role, rank]].run.remote(role, rank, method, *args), role, rank)
                for rank, args in zip(ranks, args_per_rank)]

    def submit_host(self, role: str, rank: int, method: str, *args: Any) -> tuple[Any, str, int]:
        """Start a RoleHost method on the actor of (role, rank)."""
        return getattr(self.hosts[self.host_of[role, rank]], method).remote(*args), role, rank

    def gather(self, calls: Sequence[tuple[Any, str, int]], phase: str) -> list:
        """Results of ``calls`` in order; the first death, error or the timeout raises WorkerFailure."""
        ray = self.ray
        pending = {ref: (role, rank) for ref, role, rank in calls}
        results: dict[Any, Any] = {}
        timeout = self.config.ray_startup_timeout_s if phase.startswith("start-up") else self.timeout
        deadline = time.monotonic() + timeout
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(deadline - time.monotonic(), 0.0))
            if not ready:
                role, rank = next(iter(pending.values()))
                failure = WorkerFailure("timeout", role, rank, phase, others=self.co_hosted(role, rank))
                failure.waited = timeout
                raise failure
            for ref in ready:
                role, rank = pending.pop(ref)
                try:
                    results[ref] = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # the method raised: keep its error
                    raise WorkerFailure("error", role, rank, phase, exc.cause or exc,
                                        self.co_hosted(role, rank)) from None
                except ray.exceptions.RayError as exc:  # the actor process is gone
                    raise WorkerFailure("died", role, rank, phase, exc, self.co_hosted(role, rank)) from None
        return [results[ref] for ref, _, _ in calls]

    def co_hosted(self, role: str, rank: int) -> list[tuple[str, int]]:
        """The other (role, rank) in the process of (role, rank)."""
        return [key for key in self.host_roles[self.host_of[role, rank]] if key != (role, rank)]

    def wait_idle(self, calls: Sequence[tuple[Any, str, int]]) -> bool:
        """Wait (bounded) for calls still running; True when all finished without error."""
        try:
            self.gather(calls, "draining")
            return True
        except WorkerFailure:
            return False

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for host in self.hosts:
            with contextlib.suppress(Exception):
                self.ray.kill(host, no_restart=True)
        for pg in self.placement_groups:
            with contextlib.suppress(Exception):
                remove_placement_group(pg)
