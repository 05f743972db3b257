"""Distributed RL on Ray (extra ``distributed``): PPO / GRPO / RLOO with one actor group per role.

Ray is imported only when a run asks for it (``rlhfkit ppo --ray``); without it the error names the extra.
"""

from __future__ import annotations

from typing import Any


def run_ray_rl(config: Any, **kwargs: Any) -> dict[str, Any]:
    """Run ``config`` (a PPO/GRPO/RLOO config with ``ray=True``) on Ray; see :mod:`.ray_ppo`."""
    from .ray_ppo import run_ray_rl as run

    return run(config, **kwargs)


__all__ = ["run_ray_rl"]
