"""Human evaluation report: numbers recomputed by hand from scripted labellers, the AI side by side, the CLI.

The database is built through the app's own service (import, next assignment, submit in display
positions): 3 labellers over 40 items of two policies each ("sft" vs "ppo" on 26, "sft" vs "dpo" on 8,
"ppo" vs "dpo" on 6) plus one item that names no policy, with pairwise verdicts drawn so that ppo beats sft
about 75% of the time, Likert ratings around known means and binary success at known rates (seeded).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict

import krippendorff
import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from rlhfkit.cli import main as rlhfkit_main
from rlhfkit.errors import DataError
from rlhfkit.label import service
from rlhfkit.label.cli import main as label_main
from rlhfkit.label.db import Database, Item
from rlhfkit.label.human_eval import (
    compare_with_ai,
    format_human_eval_table,
    human_eval_report,
    item_policies,
)

P_WIN = {("ppo", "sft"): 0.75, ("dpo", "sft"): 0.6, ("ppo", "dpo"): 0.5}  # P(first beats second)
LIKERT = {"sft": 3, "ppo": 4, "dpo": 3}
SUCCESS = {"sft": 0.5, "ppo": 0.8, "dpo": 0.6}
N_BOOT = 500


def _policies(i: int) -> list[str]:
    pair = ["sft", "ppo"] if i < 26 else ["sft", "dpo"] if i < 34 else ["dpo", "ppo"]
    return pair if i % 2 else pair[::-1]  # both orientations in the stored order


def _draw(rng: random.Random, pols: list[str]) -> int | None:
    """The winner (original index) of one pairwise verdict, or None for a tie (10% of verdicts)."""
    if rng.random() < 0.1:
        return None
    key = tuple(pols) if tuple(pols) in P_WIN else tuple(pols[::-1])
    first_wins = rng.random() < P_WIN[key]
    return pols.index(key[0] if first_wins else key[1])


def _imported(folder, rows):
    """The rows as ``rlhfkit label import`` reads them (a JSONL file; extra keys become the item's meta)."""
    path = folder / f"rows{len(list(folder.glob('rows*.jsonl')))}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return service.read_items(path)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """(db path, what every labeller answered in original indices: item_id -> [(coder, answers)])."""
    path = tmp_path_factory.mktemp("he") / "he.db"
    db = Database(str(path))
    rows = [{"prompt": f"question {i}?", "responses": [f"answer {i} from {p}" for p in _policies(i)],
             "policies": _policies(i)} for i in range(40)]
    rows.append({"prompt": "unnamed?", "responses": ["one", "two"]})
    project, added = service.upsert_project(db, "he", _imported(path.parent, rows),
                                            ["pairwise", "likert", "binary"], overlap=3)
    assert added == 41
    rng = random.Random(0)
    drawn: dict[int, list] = defaultdict(list)
    for n in range(3):
        user, _ = service.create_user(db, f"h{n}")
        while (a := service.next_assignment(db, user, project.id)) is not None:
            with db.session() as s:
                item = s.get(Item, a.item_id)
                pols = (item.meta or {}).get("policies")  # None: the unnamed item, labelled at random
            order = list(a.order)  # display position -> original index
            winner = _draw(rng, pols) if pols else rng.choice([0, 1, None])
            ratings = [min(5, max(1, LIKERT[p] + rng.choice([-1, 0, 0, 1]))) if pols else rng.randint(1, 5)
                       for p in pols or ("", "")]
            accept = [rng.random() < SUCCESS.get(p, 0.5) for p in pols or ("", "")]
            answers = {"pairwise": {"choice": "tie" if winner is None else "AB"[order.index(winner)]},
                       "likert": {"ratings": [ratings[o] for o in order]},
                       "binary": {"accept": [accept[o] for o in order]}}
            service.submit(db, user, a.id, f"human-eval-{n}-{a.id}", answers)
            drawn[a.item_id].append((f"h{n}", pols, winner, ratings, accept))
    db.dispose()
    return path, dict(drawn)


def test_report_numbers_equal_hand_recomputation(labelled):
    path, drawn = labelled
    report = human_eval_report(str(path), "he", baseline="sft", n_boot=N_BOOT)
    assert report["num_items"] == 41 and report["num_labels"] == 123 and report["labellers"] == 3
    assert report["items_with_2_labels"] == 41
    assert report["skipped"] == {"items_without_policies": 1, "labels_on_items_without_policies": 3,
                                 "pairwise_same_policy": 0, "pairwise_without_baseline": 18}
    for policy, n_items in (("ppo", 26), ("dpo", 8)):
        per_item = []  # each item's mean outcome over its labellers
        for labels in drawn.values():
            pols = labels[0][1]
            if pols and sorted(pols) == sorted([policy, "sft"]):
                mine = pols.index(policy)
                per_item.append(np.mean([0.5 if w is None else float(w == mine) for _, _, w, _, _ in labels]))
        m = report["policies"][policy]
        assert m["n_items"] == n_items and m["n_labels"] == 3 * n_items
        assert m["win_rate_vs_sft"] == pytest.approx(float(np.mean(per_item)), abs=1e-9)
        assert m["win_rate_ci_low"] <= m["win_rate_vs_sft"] <= m["win_rate_ci_high"]
        assert m["wins"] + m["ties"] + m["losses"] == n_items
    assert 0.6 < report["policies"]["ppo"]["win_rate_vs_sft"] < 0.9  # drawn at 75%
    assert report["policies"]["sft"]["win_rate_vs_sft"] == 0.5
    for policy in ("sft", "ppo", "dpo"):
        ratings, accepts = defaultdict(list), defaultdict(list)
        for item_id, labels in drawn.items():
            for _, pols, _, r, acc in labels:  # the unnamed item (pols None) counts for no policy
                ratings[item_id] += [v for p, v in zip(pols or (), r) if p == policy]
                accepts[item_id] += [float(v) for p, v in zip(pols or (), acc) if p == policy]
        m = report["policies"][policy]
        likert_mean = np.mean([np.mean(v) for v in ratings.values() if v])
        assert m["likert_mean"] == pytest.approx(likert_mean, abs=1e-9)
        assert m["likert_mean_ci_low"] <= m["likert_mean"] <= m["likert_mean_ci_high"]
        assert m["success_rate"] == pytest.approx(np.mean([np.mean(v) for v in accepts.values() if v]), abs=1e-9)
    assert report["policies"]["ppo"]["likert_mean"] > report["policies"]["sft"]["likert_mean"]


def test_alpha_equals_krippendorff_on_the_same_matrix(labelled):
    path, drawn = labelled
    report = human_eval_report(str(path), "he", baseline="sft", n_boot=N_BOOT)
    items = sorted(drawn)
    coders = ["h0", "h1", "h2"]
    pairwise = np.full((3, len(items)), np.nan)
    likert = np.full((3, 2 * len(items)), np.nan)
    for u, item_id in enumerate(items):
        for coder, _, winner, ratings, _ in drawn[item_id]:
            c = coders.index(coder)
            pairwise[c, u] = 1 if winner is None else 0 if winner == 0 else 2  # lower index better = 0
            likert[c, 2 * u:2 * u + 2] = ratings
    for task, matrix in (("pairwise", pairwise), ("likert", likert)):
        got = report["agreement"][task]
        assert got["items_with_2_labels"] == 41
        for level in ("nominal", "ordinal"):
            alpha = krippendorff.alpha(reliability_data=matrix, level_of_measurement=level)
            assert -1 <= got[f"krippendorff_alpha_{level}"] <= 1
            assert got[f"krippendorff_alpha_{level}"] == pytest.approx(alpha, abs=1e-12)


def _ai_dir(tmp_path, drawn, flip_every=4, match=True, pairwise=False):
    """A hand-written ``rlhfkit eval`` folder: the judge agrees with the labellers' majority, but every
    ``flip_every``-th item the other way; the last 5 named items are not sampled (unmatched). A scoring judge
    (``score`` per sample) or, with ``pairwise``, a pairwise one (``score`` None, ``verdict.p`` on each
    non-baseline sample against the baseline's; items without sft are then not judged)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    report = {"judge": "fn:toy", "baseline": "sft", "num_prompts": 35, "num_samples": 1, "confidence": 0.95,
              "policies": {"sft": {"win_rate_vs_sft": 0.5, "win_rate_ci_low": 0.5, "win_rate_ci_high": 0.5},
                           "ppo": {"win_rate_vs_sft": 0.7, "win_rate_ci_low": 0.55, "win_rate_ci_high": 0.83},
                           "dpo": {"win_rate_vs_sft": 0.52, "win_rate_ci_low": 0.3, "win_rate_ci_high": 0.7}}}
    (tmp_path / "eval.json").write_text(json.dumps(report))
    samples, expected = [], []
    for n, item_id in enumerate(sorted(drawn)[:35]):
        labels = drawn[item_id]
        i = sorted(drawn).index(item_id)
        pols = _policies(i)
        outcome = np.mean([0.5 if w is None else float(w == 0) for _, _, w, _, _ in labels])
        human = 0 if outcome > 0.5 else 2 if outcome < 0.5 else 1  # first better, even, second better
        ai = human if n % flip_every else (human + 1) % 3
        scores = {0: (2.0, 1.0), 2: (1.0, 2.0), 1: (1.5, 1.5)}[ai]
        if pairwise and "sft" not in pols:
            continue
        for k, (p, score) in enumerate(zip(pols, scores)):
            text = f"answer {i} from {p}" if match else f"other {i} {k}"
            sample = {"prompt": f"question {i}?", "prompt_row": i, "policy": p, "sample": 0, "response": text,
                      "score": None if pairwise else score}
            if pairwise and p != "sft":  # P(this sample better than sft's) from the wanted verdict
                sample["verdict"] = {"p": 0.5 + (score - scores[1 - k]) * 0.4, "p_forward": 1.0, "p_backward": 0.0}
            samples.append(sample)
        expected.append((human, ai))
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return tmp_path, expected


def test_side_by_side_kappa_equals_sklearn(labelled, tmp_path):
    path, drawn = labelled
    report = human_eval_report(str(path), "he", baseline="sft", n_boot=N_BOOT)
    folder, expected = _ai_dir(tmp_path / "ai", drawn)
    ai = compare_with_ai(report, folder)
    assert ai["matched_items"] == 35 and ai["human_items"] == 41
    h, a = zip(*expected)
    assert ai["cohen_kappa"] == pytest.approx(cohen_kappa_score(h, a), abs=1e-12)
    assert ai["percent_agreement"] == pytest.approx(np.mean([x == y for x, y in expected]))
    assert ai["policies"]["ppo"]["ai"] == 0.7 and ai["policies"]["ppo"]["ai_ci_high"] == 0.83
    assert ai["policies"]["ppo"]["human"] == report["policies"]["ppo"]["win_rate_vs_sft"]
    table = format_human_eval_table(report, ai)
    assert "AI win vs sft [CI]" in table and "0.700 [0.550, 0.830]" in table
    assert f"Cohen's kappa {ai['cohen_kappa']:.3f}" in table and "35 matched items" in table

    folder, expected = _ai_dir(tmp_path / "pairwise", drawn, pairwise=True)
    ai = compare_with_ai(report, folder)
    assert ai["matched_items"] == 34 == len(expected)
    assert ai["cohen_kappa"] == pytest.approx(cohen_kappa_score(*zip(*expected)), abs=1e-12)

    none = compare_with_ai(report, _ai_dir(tmp_path / "none", drawn, match=False)[0] / "eval.json")
    assert none["matched_items"] == 0 and none["cohen_kappa"] is None
    table = format_human_eval_table(report, none)
    assert "no human item matched" in table and "Cohen's kappa" not in table


def test_cli_end_to_end(labelled, tmp_path, capsys):
    path, drawn = labelled
    folder, _ = _ai_dir(tmp_path / "ai", drawn)
    out = tmp_path / "out"
    assert label_main(["human-eval", "--db", str(path), "--project", "he", "--baseline", "sft", "--ai-eval",
                       str(folder), "--output-dir", str(out), "--n-boot", str(N_BOOT)]) == 0
    printed = capsys.readouterr().out
    assert "human win vs sft [CI]" in printed and "likert [CI]" in printed and "35 matched items" in printed
    saved = json.loads((out / "human_eval.json").read_text())
    assert saved["baseline"] == "sft" and saved["ai"]["matched_items"] == 35
    assert saved["policies"] == json.loads(json.dumps(human_eval_report(str(path), "he", "sft", N_BOOT)["policies"]))
    # no --baseline: the policy in the most items (sft: 34 of them)
    assert rlhfkit_main(["label", "human-eval", "--db", str(path), "--project", "he", "--n-boot", "50"]) == 0
    assert "human win vs sft" in capsys.readouterr().out


def _one_line_error(capsys, *args):
    assert rlhfkit_main(["label", "human-eval", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_bad_input_is_one_line(labelled, tmp_path, capsys):
    path, _ = labelled
    assert "no project named 'nope'" in _one_line_error(capsys, "--db", str(path), "--project", "nope")
    assert "no such database file" in _one_line_error(capsys, "--db", str(tmp_path / "x.db"), "--project", "he")
    assert not (tmp_path / "x.db").exists()
    assert "'zzz' wrote no response" in _one_line_error(capsys, "--db", str(path), "--project", "he",
                                                        "--baseline", "zzz")
    assert "no eval.json in this folder" in _one_line_error(capsys, "--db", str(path), "--project", "he", "--ai-eval",
                                             str(tmp_path))
    db = Database(str(tmp_path / "bad.db"))
    service.upsert_project(db, "empty", _imported(tmp_path, [{"prompt": "p", "responses": ["a", "b"], "policies": ["x", "y"]}]))
    service.upsert_project(db, "unnamed", _imported(tmp_path, [{"prompt": "p", "responses": ["a", "b"]}]))
    service.upsert_project(db, "broken", _imported(tmp_path, [{"prompt": "p", "responses": ["a", "b"], "policies": ["x"]}]))
    for name in ("unnamed", "broken"):  # one label each, so the policies are what is wrong
        user = service.create_user(db, f"u-{name}")[0]
        with db.session() as s:
            pid = service.project_by_name(s, name).id
        a = service.next_assignment(db, user, pid)
        service.submit(db, user, a.id, f"key-{name}-1", {"pairwise": {"choice": "A"}})
    db.dispose()
    bad = str(tmp_path / "bad.db")
    assert "project 'empty' has no labels" in _one_line_error(capsys, "--db", bad, "--project", "empty")
    err = _one_line_error(capsys, "--db", bad, "--project", "unnamed")
    assert "project 'unnamed'" in err and "'policies'" in err
    err = _one_line_error(capsys, "--db", bad, "--project", "broken")
    assert "project 'broken', item" in err and "field 'policies'" in err and "2 policy names" in err
    assert "--n-boot" in _one_line_error(capsys, "--db", bad, "--project", "broken", "--n-boot", "x")


def test_item_policies_forms():
    """``policies`` per response; ``policy`` / ``model`` (what ``label generate`` stores) for all of them."""
    assert item_policies(1, ["a", "b"], {"policies": ["x", "y"]}, "p") == ["x", "y"]
    assert item_policies(1, ["a", "b"], {"source": "generate", "model": "ckpt/ppo"}, "p") == ["ckpt/ppo"] * 2
    assert item_policies(1, ["a", "b"], {"policy": "sft"}, "p") == ["sft", "sft"]
    assert item_policies(1, ["a", "b"], None, "p") is None
    with pytest.raises(DataError, match="project 'p', item 7, field 'policies'"):
        item_policies(7, ["a", "b"], {"policies": ["x", 3]}, "p")
