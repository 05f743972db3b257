"""The RL step profile (bench/profile_rl_step.py): on a real run, every timed phase is seen in every step and
the phases never add up to more than the step they are part of."""

from __future__ import annotations

import pytest
from bench_scripts import load_bench_script


@pytest.fixture(scope="module")
def profile():
    return load_bench_script("profile_rl_step")


def test_phases_of_a_real_grpo_run_add_up_within_each_step(profile, tiny_model_dir, tmp_path):
    args = profile.parse_args(["--model-dir", str(tiny_model_dir), "--steps", "5", "--warmup-steps", "1",
                               "--threads", "1"])
    prompts, reward = profile.workdir(tmp_path)
    clock = profile.StepClock()
    profile.run(args, profile.cli_args(args, prompts, reward, tmp_path / "out"), clock)
    # the clock starts at the end of the first step: 4 intervals for 5 steps
    assert len(clock.steps) == 4
    for step in clock.steps:
        phases = [step[p] for p in profile.PHASES]
        assert all(t > 0 for t in phases), step  # each timed call ran in every step
        assert sum(phases) < step["step"]
    table = profile.phase_table(clock.steps)
    assert table.count("\n") == len(profile.PHASES) + 3  # header, rule, phases, other, step
    # the wrappers are gone afterwards: a later run is not timed twice
    from rlhfkit.trainers.rl.task import RLTask

    assert not hasattr(RLTask.compute_loss, "__wrapped__")


def test_phase_table_shares_are_of_the_mean_step(profile):
    steps = [{"step": 1.0, **{p: 0.1 for p in profile.PHASES}}, {"step": 3.0, **{p: 0.3 for p in profile.PHASES}}]
    table = profile.phase_table(steps)
    # mean step 2.0 s; each phase 0.2 s = 10%; other = 2.0 - 6 x 0.2 = 0.8 s = 40%
    assert "| generation | 200.0 | 10% |" in table
    assert "| other (reward, collation, advantages, logging) | 800.0 | 40% |" in table
    assert "**step** (median 2000.0) | **2000.0**" in table


def test_product_shapes_read_from_the_profilers_input_shapes(profile):
    assert profile._mkn("aten::mm", [[519, 256], [256, 1024]]) == (519, 256, 1024)
    assert profile._mkn("aten::addmm", [[1024], [519, 256], [256, 1024], [], []]) == (519, 256, 1024)
    assert profile._mkn("aten::mm", [[2, 3, 4], [4, 5]]) is None  # not a 2-D product: left out of the table
