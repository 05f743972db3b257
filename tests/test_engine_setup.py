"""Process-level set-up: glibc's heap keeps large freed blocks for reuse (engine.setup.keep_large_blocks)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, resource, sys
import torch
from rlhfkit.engine.setup import keep_large_blocks
kept = keep_large_blocks() if sys.argv[1] == "keep" else None
faults = []
for _ in range(10):  # a training step's fresh 32 MiB tensors (logits, their gradient, a weight's gradient)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    logits = torch.empty(512, 16384).fill_(1.0)
    grad = torch.empty_like(logits).fill_(2.0)
    weight_grad = grad.t() @ logits[:, :512]  # [16384, 512]: an LM head's weight gradient
    total = logits + grad
    del logits, grad, weight_grad, total
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_large_blocks_are_reused_instead_of_page_faulted_again() -> None:
    # a 32 MiB tensor in 4 KiB pages is 8,192 page faults each time it is mapped fresh; glibc's default maps
    # every block of 32 MiB or more fresh and unmaps it on free, so every step faults its four in again
    default = _probe("default")
    assert min(default["faults"][2:]) > 3 * 8_000, default
    kept = _probe("keep")
    assert kept["kept"] is True
    assert kept["faults"][0] > 3 * 8_000, kept  # the first steps grow the heap: those faults are unavoidable
    assert max(kept["faults"][-5:]) < 1_000, kept  # the heap has grown to the step's blocks: they are reused


def test_trainer_config_keeps_large_blocks_by_default() -> None:
    from rlhfkit.engine.config import TrainConfig

    assert TrainConfig.keep_large_blocks is True
