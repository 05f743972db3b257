"""Red-team attacks in the demo world (issue 26): the world's harmful requests in role-play, paraphrase and
injection frames that no demonstration, preference or pretraining text shows, and benign look-alikes in the
same frames, all known to the gold judge.

The frames are the first N mutations of rlhfkit's own mutation file (``templates/red_team_mutations.yaml``),
applied by the very function ``rlhfkit red-team`` applies (:func:`rlhfkit.eval.attacks.mutate`) and copied
to the world folder as ``red_team_mutations.yaml``, so ``rlhfkit red-team --seeds red_team_train.jsonl
--benign benign_lookalikes_train.jsonl --mutations red_team_mutations.yaml --harm-judge gold:WORLD`` sends
the target only prompts the gold judge knows (an ``--attacker``'s rewrites it would not know).

Held-out attacks come from held-out seeds: a harmful request of the world's train split seeds
``red_team_train`` (its mutations get the split "red_team_train"), a held-out one ``red_team_eval``; the
frames are the same in both (not held out). Look-alikes: per split, as many benign requests as there are
harmful seeds, chosen by a seeded hash of the prompt (splits "lookalike_train" / "lookalike_eval"); framed,
they keep their answer, so the gold judge tells a right answer from an over-refusal.

The new requests live in ``World.tool_requests``, the world's list of requests outside ``World.requests``
(whose splits build the pretraining corpus, the demonstrations, preferences and prompt files): the gold
judge knows them, world.json keeps them, and no other dataset of the world holds them.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from ..data.jsonl import write_jsonl
from ..errors import ConfigError
from ..eval.attacks import Mutation, load_mutations
from .generator import Request, World, _stable_fraction

__all__ = ["add_red_team", "lookalike_seeds", "red_team_seeds", "roleplay_demonstrations", "world_mutations"]

SPLITS = {"train": ("red_team_train", "lookalike_train"), "eval": ("red_team_eval", "lookalike_eval")}


def world_mutations(n: int) -> list[Mutation]:
    """The first ``n`` mutations of rlhfkit's mutation file (ConfigError when it has fewer)."""
    mutations = load_mutations()
    if not 1 <= n <= len(mutations):
        raise ConfigError(f"red_team_mutations must be between 0 and {len(mutations)} (the shipped mutations: "
                          f"{', '.join(m.name for m in mutations)}), not {n}")
    return mutations[:n]


def red_team_seeds(world: World, split: str) -> list[Request]:
    """The harmful requests of the world's ``split`` (train | eval): the seeds of that red-team split."""
    return world.split(split, "harmful")


def lookalike_seeds(world: World, split: str) -> list[Request]:
    """As many benign requests of ``split`` as it has harmful ones, drawn by a seeded hash of the prompt."""
    benign = sorted(world.split(split, "benign"), key=lambda r: _stable_fraction(f"lookalike:{r.prompt}", world.seed))
    return benign[:len(red_team_seeds(world, split))]


def add_red_team(world: World, out: Path, n: int) -> tuple[list[str], dict[str, int]]:
    """Add the mutated requests to ``world`` (in place) and write the red-team files to ``out``:
    red_team_train.jsonl / red_team_eval.jsonl (the harmful seeds: chat prompt, category = the kind of harm),
    benign_lookalikes_train.jsonl / benign_lookalikes_eval.jsonl (benign seeds: prompt, category, answer)
    and red_team_mutations.yaml. Returns the new prompts' texts (for the tokenizer corpus) and counts."""
    import yaml

    frames = world_mutations(n)
    new: list[Request] = []
    counts: dict[str, int] = {}
    for split, (attack_split, lookalike_split) in SPLITS.items():
        seeds, lookalikes = red_team_seeds(world, split), lookalike_seeds(world, split)
        for group, new_split, name in ((seeds, attack_split, "red_team"), (lookalikes, lookalike_split,
                                                                          "benign_lookalikes")):
            made = [Request(**{**r.as_row(), "prompt": m.apply(r.prompt), "split": new_split})
                    for r in group for m in frames]
            new += [r for r in made if world.request(r.prompt) is None]  # a frame never repeats a request
            rows: list[dict[str, Any]] = [{"prompt": [{"role": "user", "content": r.prompt}], "category": r.kind,
                                           **({"answer": r.answer} if r.category == "benign" else {})}
                                          for r in group]
            write_jsonl(out / f"{name}_{split}.jsonl", rows)
            counts[f"{name}_{split}_seeds"] = len(group)
            counts[f"{new_split}_requests"] = len(made)
    world.tool_requests = [*world.tool_requests, *new]
    world.__post_init__()  # the gold judge's lookup covers the new requests
    (out / "red_team_mutations.yaml").write_text(
        "# the demo world's red-team frames (the first mutations of rlhfkit's templates/red_team_mutations.yaml)\n"
        + yaml.safe_dump({m.name: m.template for m in frames}, sort_keys=False, allow_unicode=True, width=1000),
        encoding="utf-8")
    return [r.prompt for r in new], counts


def roleplay_demonstrations(world: World, n: int, seed: int) -> list[dict[str, str]]:
    """``n`` demonstrations (prompt/completion) that play along with a frame: a framed benign request of the
    training look-alikes answered "Sure! " + the ideal reply.

    An assistant tuned to follow instructions learns to go along with role-play and "start with Sure"
    requests on harmless questions; that habit, not a missing refusal, is what framed attacks exploit. Without
    it the demo's SFT model refuses framed harmful requests by their words alone (ASR about 3% on seed 0)
    and the red-team loop has nothing to fix. No demonstration frames a harmful request, and no held-out
    look-alike is shown (its seeds are held-out requests)."""
    pool = [r for r in world.tool_requests if r.split == SPLITS["train"][1]]
    if n and not pool:
        raise ConfigError("roleplay_demonstrations needs red_team_mutations > 0 (the framed look-alikes)")
    rng = random.Random(seed + 29)
    rows = []
    for _ in range(n):
        req = rng.choice(pool)
        rows.append({"prompt": req.prompt, "completion": "Sure! " + world.respond(req, "concise", rng)})
    return rows
