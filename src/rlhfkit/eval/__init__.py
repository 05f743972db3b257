"""Evaluation: judge win rates with bootstrap intervals, length control, KL, RM accuracy.

``stats`` is pure (numpy / statsmodels); ``runner`` samples from models and backs ``rlhfkit eval``;
``compare`` turns a scoring or pairwise judge's verdicts into each policy's figures against the baseline. The
reward-hacking detector watches training runs, so it lives with them (``rlhfkit.trainers.rl.hacking``).
"""

from .stats import (
    WinRate,
    bootstrap_mean_ci,
    length_controlled_win_rate,
    pairwise_outcomes,
    win_rate,
)

__all__ = [
    "WinRate",
    "bootstrap_mean_ci",
    "evaluate_policies",
    "length_controlled_win_rate",
    "load_judge",
    "pairwise_outcomes",
    "win_rate",
]


def __getattr__(name: str):
    # the runner pulls in torch and transformers: import it only when asked for
    if name == "load_judge":  # parsed with every other judge spec in rlhfkit.judges.spec
        from ..judges.spec import load_judge

        return load_judge
    if name == "evaluate_policies":
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'rlhfkit.eval' has no attribute {name!r}")
