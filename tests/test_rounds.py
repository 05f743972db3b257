"""The ``rounds`` stage (iterated RLHF, issue 26): labels accumulate round by round, each round starts from the
last one's policy, a killed round resumes where it stopped, config mistakes stop the run before it starts, a
real tiny chain (collect -> rm -> dpo -> eval) runs twice, and the report shows the round table."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhfkit.errors import ConfigError
from rlhfkit.pipeline import run_pipeline
from rlhfkit.rounds import SEED_STRIDE
from rlhfkit.stage import StageContext, stage

# ------------------------------------------------------------------ tiny stage types (registered on import)


def _note(ctx: StageContext, what: str) -> None:
    """One line per invocation in the shared log: which step ran in which round."""
    with open(ctx.option("log"), "a", encoding="utf-8") as fh:
        fh.write(f"{what} {ctx.output_dir.parent.name}\n")


@stage("t_init", options=())
def _init(ctx: StageContext) -> dict:
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    return {}


@stage("t_label", options=("policy", "k", "round", "log"))
def _label(ctx: StageContext) -> dict:
    """k rows labelled by ``policy`` with numbers drawn from the step's seed (new in every round)."""
    _note(ctx, "label")
    rng = random.Random(ctx.seed)
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"r{ctx.option('round')}-{i}", "policy": ctx.option("policy"), "value": rng.random()}
            for i in range(int(ctx.option("k")))]
    (ctx.output_dir / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"rows": len(rows), "seed": ctx.seed}


@stage("t_train", options=("policy", "data", "log", "kill_in", "marker"))
def _train(ctx: StageContext) -> dict:
    """Records the rows it saw; with ``kill_in: round-K`` it SIGKILLs its own process once (``marker``)."""
    _note(ctx, "train")
    if ctx.output_dir.parent.name == ctx.option("kill_in") and not Path(ctx.option("marker")).exists():
        Path(ctx.option("marker")).write_text("killed")
        os.kill(os.getpid(), signal.SIGKILL)
    rows = [json.loads(line) for line in Path(ctx.option("data")).read_text().splitlines()]
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    (ctx.output_dir / "seen.json").write_text(json.dumps(rows))
    (ctx.output_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0 / len(rows)}) + "\n")
    return {"seen": len(rows), "value": sum(r["value"] for r in rows), "from": ctx.option("policy")}


@stage("t_eval", options=("policy", "seed_ref", "out", "log"))
def _eval(ctx: StageContext) -> dict:
    _note(ctx, "eval")
    seen = json.loads((Path(ctx.option("policy")) / "seen.json").read_text())
    return {"score": sum(r["value"] for r in seen) / len(seen), "policies": {"p": {"kl": 0.1 * len(seen)}},
            "seed_ref": ctx.option("seed_ref"), "out": ctx.option("out"), "seed": ctx.seed}


def _config(root: Path, out: Path, rounds: int = 3, **train: str) -> Path:
    """A pipeline: an outer stage named like a step (``train``: a step's name shadows it inside the rounds),
    then 3 rounds of label -> train on the labels so far -> eval."""
    log = str(root / "calls.log")
    data = {"output_dir": str(out), "seed": 5, "stages": {
        "train": {"type": "t_init"},
        "loop": {"type": "rounds", "rounds": rounds, "policy": "${train}", "next_policy": "train",
                 "accumulate": ["label/rows.jsonl"],
                 "figures": {"seen": "train.seen", "score": "eval.score", "kl": "eval.policies.p.kl"},
                 "steps": {
                     "label": {"type": "t_label", "policy": "${policy}", "k": 4, "round": "${round}", "log": log},
                     "train": {"type": "t_train", "policy": "${policy}", "data": "${labels_so_far}", "log": log,
                               **train},
                     "eval": {"type": "t_eval", "policy": "${train}", "seed_ref": "${seed}", "out": "${output_dir}",
                              "log": log}}}}}
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def three_rounds(tmp_path_factory):
    root = tmp_path_factory.mktemp("rounds")
    out = root / "run"
    results = run_pipeline(_config(root, out), log=lambda _: None)
    return root, out, results


def test_three_rounds_accumulate_labels_and_chain_policies(three_rounds, capsys):
    root, out, results = three_rounds
    loop = out / "loop"
    for k in (1, 2, 3):
        rows = [json.loads(line) for line in (loop / f"round-{k}" / "labels_so_far.jsonl").read_text().splitlines()]
        assert len(rows) == 4 * k  # 1x, 2x, 3x
        assert [r["round"] for r in rows] == [r for r in range(1, k + 1) for _ in range(4)]
        assert [r["id"] for r in rows] == [f"r{r}-{i}" for r in range(1, k + 1) for i in range(4)]
        seen = json.loads((loop / f"round-{k}" / "train" / "seen.json").read_text())
        assert seen == rows  # the train step read exactly the labels so far
    # ${policy}: round 1's option (the outer stage 'train'), then the last round's step 'train' (shadowing it)
    policies = [json.loads((loop / f"round-{k}" / "label" / "rows.jsonl").read_text().splitlines()[0])["policy"]
                for k in (1, 2, 3)]
    assert policies == [str(out / "train"), str(loop / "round-1" / "train"), str(loop / "round-2" / "train")]
    record = json.loads((loop / "rounds.json").read_text())
    assert record["done"] == 3 and [r["round"] for r in record["table"]] == [1, 2, 3]
    for k, row in enumerate(record["table"], 1):
        steps = record["per_round"][k - 1]["steps"]
        assert row["seen"] == 4 * k and row["kl"] == pytest.approx(0.4 * k)
        assert row["score"] == pytest.approx(steps["train"]["value"] / (4 * k))
        # every step of round k runs with seed 5 + 1000k, which ${seed} also gives; ${output_dir} is the run's
        assert steps["label"]["seed"] == steps["eval"]["seed"] == 5 + SEED_STRIDE * k
        assert steps["eval"]["seed_ref"] == str(5 + SEED_STRIDE * k) and steps["eval"]["out"] == str(out)
        assert record["per_round"][k - 1]["labels_so_far"] == 4 * k
    # new numbers every round (its own seed), and the summary lists each figure over the rounds
    assert len({r["score"] for r in record["table"]}) == 3
    assert results["loop"]["figures"]["seen"] == [4, 8, 12]
    assert results["loop"]["final_policy"] == str(loop / "round-3" / "train")
    # rerun over finished rounds (as after a kill between the last step and the stage's own stage_done.json):
    # no step runs again, and the table is printed once more
    calls = (root / "calls.log").read_text()
    (loop / "stage_done.json").unlink()
    run_pipeline(_config(root, out), log=lambda _: None)
    assert (root / "calls.log").read_text() == calls
    text = capsys.readouterr().out.splitlines()
    head = text.index(next(line for line in text if line.startswith("round ")))
    assert text[head].split() == ["round", "seen", "score", "kl"]
    assert [line.split()[:2] for line in text[head + 1:head + 4]] == [["1", "4"], ["2", "8"], ["3", "12"]]


def test_a_round_killed_midway_resumes_where_it_stopped(three_rounds, tmp_path):
    """SIGKILL in round 2's train step (a subprocess); the rerun runs no step of round 1 nor round 2's label
    step again, and ends with the figures of the uninterrupted run."""
    _, _, uninterrupted = three_rounds
    out = tmp_path / "run"
    config = _config(tmp_path, out, kill_in="round-2", marker=str(tmp_path / "killed"))
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_rounds; "
              f"from rlhfkit.pipeline import run_pipeline; run_pipeline({str(config)!r})")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    log = tmp_path / "calls.log"
    assert log.read_text().split("\n")[:-1] == ["label round-1", "train round-1", "eval round-1", "label round-2",
                                                "train round-2"]
    assert json.loads((out / "loop" / "rounds.json").read_text())["done"] == 1  # round 1 recorded, not round 2
    log.write_text("")
    results = run_pipeline(config, log=lambda _: None)
    assert log.read_text().split("\n")[:-1] == ["train round-2", "eval round-2", "label round-3", "train round-3",
                                                "eval round-3"]
    assert results["loop"]["figures"] == uninterrupted["loop"]["figures"]
    resumed = json.loads((out / "loop" / "rounds.json").read_text())
    assert resumed["table"] == json.loads((three_rounds[1] / "loop" / "rounds.json").read_text())["table"]


# ------------------------------------------------------------------ config mistakes: one line, before anything runs


def _edit(config: Path, change) -> Path:
    data = yaml.safe_load(config.read_text())
    change(data["stages"]["loop"])
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config


@pytest.mark.parametrize("change, message", [
    (lambda s: s["steps"]["eval"].update(policy="${nowhere}"),
     r"stage 'loop': step 'eval': unknown reference \$\{nowhere\}"),
    (lambda s: s["steps"]["label"].update(policy="${train}"),  # a later step of the same round
     r"stage 'loop': step 'label': unknown reference \$\{train\}"),
    (lambda s: s.update(next_policy="ppo"), "stage 'loop': next_policy must name the step .*got 'ppo'"),
    (lambda s: s.update(rounds=0), "stage 'loop': rounds must be a whole number >= 1 .got 0."),
    (lambda s: s.update(figures={"gold": "judge.score"}), "stage 'loop': figure 'gold': 'judge.score' must be"),
    (lambda s: s["steps"]["label"].update(kk=3), "stage 'loop': step 'label': unknown t_label option 'kk'"),
    (lambda s: s["steps"]["label"].update(type="t_lable"), "step 'label': unknown type 't_lable'; did you mean"),
    (lambda s: s["steps"]["eval"].update(out="${previous.eval}"),
     r"round 1 has no previous round for \$\{previous.eval\}: give first: \{eval: PATH\}"),
    (lambda s: s.update(accumulate=["eval/rows.jsonl"]), "accumulate: 'eval/rows.jsonl' must be a file in the"),
    (lambda s: s.pop("accumulate"), r"step 'train' reads \$\{labels_so_far\}, but 'accumulate' names no files"),
    (lambda s: s.update(rounds_=2), "stage 'loop': unknown rounds option 'rounds_'"),
], ids=["unknown-ref", "later-step-ref", "next-policy", "zero-rounds", "figure-step", "step-option", "step-type",
        "previous-in-round-1", "accumulate-late", "accumulate-missing", "rounds-option"])
def test_a_bad_rounds_config_stops_before_any_stage_runs(tmp_path, change, message):
    out = tmp_path / "run"
    config = _edit(_config(tmp_path, out), change)
    with pytest.raises(ConfigError, match=message) as err:
        run_pipeline(config, log=lambda _: None)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(config))
    assert not out.exists()


def test_previous_refs_and_a_missing_figure(tmp_path):
    """``${previous.STEP}`` is ``first``'s path in round 1 and the last round's folder after; a figure path
    that no summary holds stops the run after round 1, naming the path."""
    out = tmp_path / "run"
    config = _edit(_config(tmp_path, out, rounds=2), lambda s: (
        s["steps"]["eval"].update(out="${previous.train}"), s.update(first={"train": "/first/model"})))
    results = run_pipeline(config, log=lambda _: None)
    record = json.loads((out / "loop" / "rounds.json").read_text())
    assert [r["steps"]["eval"]["out"] for r in record["per_round"]] == ["/first/model",
                                                                        str(out / "loop" / "round-1" / "train")]
    assert results["loop"]["figures"]["seen"] == [4, 8]
    config = _edit(_config(tmp_path, tmp_path / "run2"), lambda s: s.update(figures={"gold": "eval.policies.q.kl"}))
    with pytest.raises(ConfigError, match=r"figure 'gold': eval.policies.q.kl not found after round 1 "
                                          r"\(eval.policies holds: p\)"):
        run_pipeline(config, log=lambda _: None)
    assert not (tmp_path / "run2" / "loop" / "round-2").exists()


def test_the_report_shows_the_round_table_and_plots(three_rounds, tmp_path):
    from rlhfkit.report import build_report

    _, out, _ = three_rounds
    html = build_report(out, output=tmp_path / "report.html").read_text()
    assert "<h2>Rounds: loop</h2>" in html and "3 of 3 round(s) done" in html
    record = json.loads((out / "loop" / "rounds.json").read_text())
    section = html.split("<h2>Rounds: loop</h2>")[1].split("</section>")[0]
    body = section.split("<tbody>")[1].split("</tbody>")[0]
    assert body.count("<tr>") == 3 and "seen by round" in section and "kl by round" in section
    from rlhfkit.report.page import fmt

    assert all(fmt(row["score"]) in body for row in record["table"])
    # a folder holding only a rounds.json is a report too
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "rounds.json").write_text((out / "loop" / "rounds.json").read_text())
    assert "<h2>Rounds: only</h2>" in build_report(tmp_path / "only").read_text()


# ------------------------------------------------------------------ a real chain on a tiny model

REAL = """
output_dir: {out}
seed: 3
defaults: {{num_threads: 1, progress_bar: false, max_length: 48, eval_on_start: false}}
stages:
  world: {{type: world, sft_demonstrations: 40, rl_prompts: 16}}
  base: {{type: tiny_model, corpus: "${{world}}/tokenizer_corpus.txt", vocab: 300, layers: 1, hidden: 32}}
  sft: {{type: sft, model: "${{base}}", dataset: "${{world}}/sft.jsonl", max_steps: 30, per_device_batch_size: 16,
       learning_rate: 3.0e-3}}
  iterate:
    type: rounds
    rounds: 2
    policy: ${{sft}}
    next_policy: dpo
    accumulate: [label/ranked.jsonl]
    figures: {{rm_accuracy: eval.rm.accuracy, gold: eval.policies.policy.judge_score, kl: eval.policies.policy.kl}}
    steps:
      label: {{type: collect, policy: "${{policy}}", world: "${{world}}", num_samples: 2, max_prompts: 6,
              heldout_samples: 3, max_new_tokens: 12}}
      rm: {{type: rm, model: "${{sft}}", dataset: "${{labels_so_far}}", max_steps: 2}}
      dpo: {{type: dpo, model: "${{policy}}", dataset: "${{labels_so_far}}", max_steps: 2}}
      eval: {{type: eval, policies: {{policy: "${{dpo}}"}}, prompts: "${{world}}/prompts_eval.jsonl",
             judge: "gold:${{world}}", reference: "${{policy}}", reward_model: "${{rm}}",
             pairs: "${{label}}/gold_pairs.jsonl", num_samples: 1, max_new_tokens: 8, n_boot: 50, max_prompts: 6}}
"""


@pytest.mark.slow
def test_two_real_rounds_collect_rm_dpo_eval(tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "real.yaml"
    config.write_text(REAL.format(out=out))
    results = run_pipeline(config, log=lambda _: None)
    loop = out / "iterate"
    record = json.loads((loop / "rounds.json").read_text())
    assert [r["round"] for r in record["table"]] == [1, 2]
    for row in record["table"]:
        assert 0.0 <= row["rm_accuracy"] <= 1.0 and isinstance(row["gold"], float) and isinstance(row["kl"], float)
    one, two = (sum(1 for _ in open(loop / f"round-{k}" / "label" / "ranked.jsonl")) for k in (1, 2))
    assert record["per_round"][1]["labels_so_far"] == one + two and record["per_round"][0]["labels_so_far"] == one
    # round 2 sampled from round 1's DPO model, and its DPO started there
    assert record["per_round"][1]["policy"] == str(loop / "round-1" / "dpo")
    dpo2 = json.loads((loop / "round-2" / "dpo" / "stage_done.json").read_text())
    assert dpo2["options"]["model"] == str(loop / "round-1" / "dpo")
    assert results["iterate"]["final_policy"] == str(loop / "round-2" / "dpo")


def test_rounds_carry_the_adaptive_beta_from_one_round_to_the_next(tmp_path, tiny_model_dir, count_e_files):
    """``kl_coef_from: ${previous.rl}`` (round 1: ``first: {rl: ""}``, i.e. --kl-coef): each round's β starts
    where the last round's controller ended, so iterated RL keeps one leash instead of slackening every round."""
    out = tmp_path / "run"
    rl = {"type": "rloo", "model": "${policy}", "dataset": str(count_e_files / "prompts.jsonl"),
          "reward_fn": f"{count_e_files / 'reward.py'}:count_e", "max_steps": 2, "max_new_tokens": 8,
          "prompts_per_step": 2, "kl_coef": 0.05, "kl_target": 50.0, "kl_horizon": 10, "progress_bar": False,
          "kl_coef_from": "${previous.rl}"}
    data = {"output_dir": str(out), "seed": 0, "stages": {"loop": {
        "type": "rounds", "rounds": 2, "policy": str(tiny_model_dir), "next_policy": "rl", "first": {"rl": ""},
        "steps": {"rl": rl}}}}
    config = tmp_path / "carry.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    run_pipeline(config, log=lambda _: None)
    betas = {k: [json.loads(x)["beta"] for x in (out / "loop" / f"round-{k}" / "rl" / "metrics.jsonl").open()
                 if '"beta"' in x] for k in (1, 2)}
    final = json.loads((out / "loop" / "round-1" / "rl" / "summary.json").read_text())["kl_coef_final"]
    assert betas[1][0] == 0.05 and final < betas[1][-1] < 0.05  # the KL is far under the target: β falls
    assert betas[2][0] == pytest.approx(final, rel=1e-12) and betas[2][-1] < betas[2][0]
