"""The RL bench's pooled and paired speed-ups (bench/bench_rl_vs_trl.py): the figures the README quotes."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from bench_scripts import load_bench_script


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("bench_rl_vs_trl")


def _run(algo, library, repeat, s_per_step, rss=700.0):
    return {"algo": algo, "library": library, "repeat": repeat, "s_per_step": s_per_step, "peak_rss_mib": rss}


def test_paired_speedups_pair_runs_of_the_same_repeat(bench):
    runs = [_run("grpo", "trl", 1, 0.8), _run("grpo", "rlhfkit", 1, 0.4),
            _run("grpo", "trl", 2, 0.6), _run("grpo", "rlhfkit", 2, 0.4),
            _run("grpo", "rlhfkit", 3, 0.1),  # no TRL run in repeat 3: unpaired, left out
            {**_run("grpo", "trl", 4, 0.9), "error": "crashed"}, _run("grpo", "rlhfkit", 4, 0.3),
            _run("rloo", "trl", 1, 10.0)]
    assert bench.paired_speedups(runs, "grpo", "rlhfkit") == pytest.approx([2.0, 1.5])
    assert bench._paired([2.0, 1.5]) == f"{math.sqrt(3.0):.2f}× (1.50–2.00)"
    assert bench._paired([2.0]) == ""  # one pair is not a spread


def test_pool_takes_every_run_of_every_file(bench, tmp_path):
    files = []
    for batch, (trl, mine) in enumerate([((0.70, 0.80), (0.35, 0.30)), ((0.60, 0.90), (0.40, 0.45))]):
        runs = [_run("grpo", "trl", rep + 1, t, rss=760) for rep, t in enumerate(trl)]
        runs += [_run("grpo", "rlhfkit-compiled", rep + 1, s, rss=740) for rep, s in enumerate(mine)]
        path = tmp_path / f"rl_{batch}.json"
        path.write_text(json.dumps({"info": {"git": f"abc{batch}"}, "runs": runs}))
        files.append(str(path))
    table = bench.pool(files)
    row = next(line for line in table.splitlines() if "rlhfkit-compiled" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    ratios = [0.70 / 0.35, 0.80 / 0.30, 0.60 / 0.40, 0.90 / 0.45]  # repeat 1 of file 0 pairs only with its own TRL
    assert cells[:5] == ["GRPO", "rlhfkit-compiled", "4", "0.375", "0.300–0.450"]
    assert cells[5] == f"**{statistics.median([0.7, 0.8, 0.6, 0.9]) / 0.375:.2f}×**"
    low, high = bench.median_ratio_interval(bench.pooled_runs(files)[0], "grpo", "rlhfkit-compiled")
    assert cells[6] == f"{low:.2f}–{high:.2f}×"
    assert cells[7] == f"{statistics.geometric_mean(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})"
    assert cells[8] == f"{740 / 760:.2f}×"
    assert "rl_0 (abc0), rl_1 (abc1)" in table.splitlines()[0]


def test_median_ratio_interval_resamples_whole_repeats(bench):
    # every repeat 2x: any resample of repeats gives 2x
    steady = [_run("grpo", lib, rep, t) for rep in range(4)
              for lib, t in (("trl", 0.5 + rep), ("rlhfkit", (0.5 + rep) / 2))]
    assert bench.median_ratio_interval(steady, "grpo", "rlhfkit") == pytest.approx((2.0, 2.0))
    # three repeats: 27 equally likely resamples; with 2000 draws the 2.5% and 97.5% points are the extremes
    trl, mine = [1.0, 2.0, 3.0], [0.5, 1.5, 1.0]
    runs = [_run("grpo", "trl", k, trl[k]) for k in range(3)]
    runs += [_run("grpo", "rlhfkit", k, mine[k]) for k in range(3)]
    outcomes = [statistics.median(trl[k] for k in d) / statistics.median(mine[k] for k in d)
                for d in ((a, b, c) for a in range(3) for b in range(3) for c in range(3))]
    assert bench.median_ratio_interval(runs, "grpo", "rlhfkit") == pytest.approx((min(outcomes), max(outcomes)))
    # an unpaired or failed repeat does not count; under three paired repeats there is no interval
    runs[0] = {**runs[0], "error": "crashed"}
    assert bench.median_ratio_interval(runs, "grpo", "rlhfkit") is None
