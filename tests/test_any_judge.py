"""Any judge, anywhere: pairwise judges in `rlhfkit eval --judge` and as the RL trainers' `--reward-judge`,
and an OpenAI-compatible judge against a real chat server process on the loopback interface."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from toy import save_e_heavy_policy

from rlhfkit.cli import main
from rlhfkit.errors import ConfigError
from rlhfkit.eval import evaluate_policies
from rlhfkit.rollout.generate import SamplingConfig

SCALE = 10.0  # the length judge: P(first better) = sigmoid((len(first) - len(second)) / SCALE)
JUDGES = f'''
import math

def longer(prompt, first, second):
    return 1.0 / (1.0 + math.exp(-(len(first) - len(second)) / {SCALE}))

def first_slot(prompt, first, second):
    return "A"
'''
N_PROMPTS = 6


def _p_longer(a: str, b: str) -> float:
    return 1.0 / (1.0 + math.exp(-(len(a) - len(b)) / SCALE))


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir):
    """Policies ``base`` (the tiny model) and ``short`` (its 'e' token boosted: one-character tokens, so
    shorter texts), the judges file and a prompt file with categories and a ``chosen`` column."""
    root = tmp_path_factory.mktemp("any_judge")
    save_e_heavy_policy(tiny_model_dir, root / "short")
    (root / "judges.py").write_text(JUDGES)
    rows = [{"prompt": f"Tell me about item {i}.", "category": "ab"[i % 2], "chosen": "x" * (5 + 4 * i)}
            for i in range(N_PROMPTS)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "base": str(tiny_model_dir), "short": str(root / "short"), "rows": rows,
            "longer": f"pairfn:{root / 'judges.py'}:longer", "first": f"pairfn:{root / 'judges.py'}:first_slot"}


def _samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------- eval


def test_eval_pairwise_win_rate_is_the_mean_judge_p(files, tmp_path, capsys):
    out = tmp_path / "eval"
    k = 2
    rc = main(["eval", "--policy", f"short={files['short']},base={files['base']}", "--baseline", "base",
               "--prompts", str(files["root"] / "prompts.jsonl"), "--judge", files["longer"], "--num-samples",
               str(k), "--max-new-tokens", "8", "--n-boot", "200", "--output-dir", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert f"{N_PROMPTS * k} of {N_PROMPTS * k} verdicts read" in table and "judge column empty" in table
    report = json.loads((out / "eval.json").read_text())
    assert report["judge_type"] == "pairwise"
    samples = _samples(out)
    by = {(s["policy"], s["prompt_row"], s["sample"]): s for s in samples}
    p = np.array([[_p_longer(by["short", i, s]["response"], by["base", i, s]["response"]) for s in range(k)]
                  for i in range(1, N_PROMPTS + 1)])  # recomputed from the texts by the judge's rule
    for i in range(N_PROMPTS):
        for s in range(k):
            verdict = by["short", i + 1, s]["verdict"]
            assert verdict["p"] == pytest.approx(p[i, s], abs=1e-12)
            assert verdict["p_forward"] == pytest.approx(verdict["p_backward"], abs=1e-12)  # no position effect
            assert by["short", i + 1, s]["score"] is None
    m = report["policies"]["short"]
    assert m["win_rate_vs_base"] == pytest.approx(p.mean(), abs=1e-9)
    assert m["win_rate_vs_base"] < 0.4  # the shorter policy loses under a length-loving judge
    assert (m["judge_pairs"], m["judge_failures"]) == (N_PROMPTS * k, 0)
    assert m["judge_score"] is None and m["win_rate_ci_low"] <= m["win_rate_vs_base"] <= m["win_rate_ci_high"]
    assert m["lc_win_rate"] is not None and 0.0 <= m["lc_win_rate"] <= 1.0
    assert (m["wins"], m["ties"], m["losses"]) == ((p.mean(1) > 0.5).sum(), (p.mean(1) == 0.5).sum(),
                                                   (p.mean(1) < 0.5).sum())
    base = report["policies"]["base"]
    assert base["win_rate_vs_base"] == 0.5 and "judge_pairs" not in base
    assert all("verdict" not in s for s in samples if s["policy"] == "base")
    cat = report["by_category"]["short"]
    assert cat["a"]["win_rate"] == pytest.approx(p[0::2].mean(), abs=1e-9)
    assert cat["b"]["win_rate"] == pytest.approx(p[1::2].mean(), abs=1e-9) and cat["b"]["judge_score"] is None


def test_position_biased_judge_gives_exactly_half(files):
    report = evaluate_policies({"base": files["base"], "short": files["short"]}, "base", files["rows"],
                               files["first"], sampling=SamplingConfig(max_new_tokens=6), n_boot=50)
    m = report["policies"]["short"]
    assert m["win_rate_vs_base"] == 0.5 and m["lc_win_rate"] == 0.5
    assert (m["wins"], m["ties"], m["losses"]) == (0, N_PROMPTS, 0)


def test_eval_output_dir_never_replaces_a_training_runs_samples(files, tmp_path, capsys):
    run = tmp_path / "grpo-run"
    run.mkdir()
    (run / "samples.jsonl").write_text('{"step": 1, "prompt": "p", "response": "r"}\n')
    args = ["eval", "--policy", f"base={files['base']}", "--policy", f"short={files['short']}", "--prompts",
            str(files["root"] / "prompts.jsonl"), "--judge", files["longer"], "--max-new-tokens", "4"]
    assert main([*args, "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"rlhfkit eval: error: --output-dir {run} holds samples.jsonl with no eval.json beside it (not " \
                  "written by this command; a training run's?); choose another folder"
    assert (run / "samples.jsonl").read_text() == '{"step": 1, "prompt": "p", "response": "r"}\n'
    # the prompts file itself is never an output either
    prompts_dir = tmp_path / "p"
    prompts_dir.mkdir()
    (prompts_dir / "samples.jsonl").write_text((files["root"] / "prompts.jsonl").read_text())
    (prompts_dir / "eval.json").write_text("{}")
    assert main([*args[:6], str(prompts_dir / "samples.jsonl"), *args[7:], "--output-dir", str(prompts_dir)]) == 2
    assert "would replace the input" in capsys.readouterr().err


def test_a_pairwise_function_given_as_fn_is_pointed_to_pairfn(files, tmp_path, capsys):
    as_scorer = files["longer"].replace("pairfn:", "fn:")
    args = ["eval", "--policy", f"base={files['base']}", "--policy", f"short={files['short']}", "--prompts",
            str(files["root"] / "prompts.jsonl"), "--output-dir", str(tmp_path / "ev"), "--max-new-tokens", "4"]
    assert main([*args, "--judge", as_scorer]) == 2
    err = capsys.readouterr().err.strip()
    assert "has a required parameter 'second'" in err and "\n" not in err
    assert err.endswith(f"; if longer(prompt, first, second) compares two responses, it is a pairwise judge: "
                        f"--judge {files['longer']}")
    assert not (tmp_path / "ev").exists()  # refused before any sampling
    # a scoring function of (prompts, responses, column) whose column is missing gets no such hint
    (tmp_path / "score.py").write_text("def by_answer(prompts, responses, answer):\n    return [0.0] * len(responses)\n")
    assert main([*args, "--judge", f"fn:{tmp_path / 'score.py'}:by_answer"]) == 2
    err = capsys.readouterr().err
    assert "required parameter 'answer'" in err and "pairfn" not in err

# ------------------------------------------------------------------------------------------------- RL


def _rl_args(files, out: Path, algo: str, *extra: str) -> list[str]:
    return [algo, "--model", files["base"], "--dataset", str(files["root"] / "prompts.jsonl"), "--output-dir",
            str(out), "--max-new-tokens", "6", "--no-progress-bar", "--learning-rate", "1e-3", "--sample-steps",
            "1", *extra]


def test_grpo_group_rewards_are_the_group_mean_p(files, tmp_path):
    out = tmp_path / "grpo"
    g, prompts = 3, 2
    rc = main(_rl_args(files, out, "grpo", "--reward-judge", files["longer"], "--max-steps", "2",
                       "--num-generations", str(g), "--prompts-per-step", str(prompts), "--num-logged-samples",
                       str(g * prompts)))
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward_mean" in r]
    samples = _samples(out)
    assert [r["step"] for r in rows] == [1, 2] and len(samples) == 2 * g * prompts
    for step, row in zip((1, 2), rows):
        mine = [s for s in samples if s["step"] == step]
        expected = []
        for start in range(0, len(mine), g):
            group = mine[start:start + g]
            assert len({s["prompt"] for s in group}) == 1
            for i, s in enumerate(group):
                want = np.mean([_p_longer(s["response"], o["response"]) for j, o in enumerate(group) if j != i])
                assert s["reward"] == pytest.approx(want, abs=1e-6)
                expected.append(want)
        assert row["reward/judge_mean"] == pytest.approx(np.mean(expected), abs=1e-6)
        assert row["reward_mean"] == pytest.approx(np.mean(expected), abs=1e-6)


def test_ppo_needs_a_reference_column_then_runs(files, tmp_path, capsys):
    args = _rl_args(files, tmp_path / "ppo", "ppo", "--reward-judge", files["longer"], "--max-steps", "1",
                    "--prompts-per-step", "2", "--num-logged-samples", "2")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--reward-judge-reference" in err[0] and "no group" in err[0]
    assert main(args + ["--reward-judge-reference", "chosen"]) == 0
    chosen = {r["prompt"]: r["chosen"] for r in files["rows"]}
    samples = _samples(tmp_path / "ppo")
    assert len(samples) == 2
    for s in samples:  # P(response better than the row's chosen response)
        assert s["reward"] == pytest.approx(_p_longer(s["response"], chosen[s["prompt"]]), abs=1e-6)
    with pytest.raises(ConfigError, match="not a column"):
        from rlhfkit.trainers.rl.config import PPOConfig
        from rlhfkit.trainers.rl.run import run_rl

        run_rl(PPOConfig(model=files["base"], dataset=str(files["root"] / "prompts.jsonl"),
                         output_dir=str(tmp_path / "bad"), reward_judge=files["longer"],
                         reward_judge_reference="missing", max_steps=1, progress_bar=False))


# ------------------------------------------------------------------------------- OpenAI-compatible server


VERDICT = "Verdict: A"


@pytest.fixture(scope="module")
def verdict_model(tmp_path_factory, tiny_model_dir):
    """The tiny model trained for a few dozen steps to answer every judge prompt with "Verdict: A" (a judge
    that always picks the first slot: real, parseable replies whose both-orders average is exactly 1/2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.judges.templates import load_template

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    template = load_template(None, "pairwise")
    texts = [tok.apply_chat_template(template.messages(prompt=f"Question {i}?", response_a="e" * i + " cat",
                                                       response_b=f"dog {i} " * (i % 3), principles=""),
                                     tokenize=False, add_generation_prompt=True) for i in range(6)]
    target = tok(VERDICT, add_special_tokens=False).input_ids + [tok.eos_token_id]
    batches = [(tok(t, add_special_tokens=False).input_ids, target) for t in texts]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(40):
        loss = 0.0
        for prompt, answer in batches:
            ids = torch.tensor([prompt + answer])
            labels = torch.tensor([[-100] * len(prompt) + answer])
            loss = loss + model(ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = tmp_path_factory.mktemp("verdict_lm")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(verdict_model, tiny_model_dir):
    """tests/openai_server.py in its own process on a free loopback port: model ``verdict`` (trained above)
    and ``random`` (the untrained tiny model, whose replies name no verdict)."""
    port = _free_port()
    script = Path(__file__).with_name("openai_server.py")
    proc = subprocess.Popen([sys.executable, str(script), "--model", f"verdict={verdict_model}", "--model",
                             f"random={tiny_model_dir}", "--port", str(port), "--max-new-tokens", "8"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"openai_server exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                _get(base + "/health")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield base
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_openai_judge_against_a_real_server(files, server, tmp_path, capsys):
    from rlhfkit.judges import OpenAIJudge

    judge = OpenAIJudge("verdict", server + "/v1")
    assert judge.chat([{"role": "user", "content": "Which is better?"}]).strip() == VERDICT
    before = _get(server + "/stats")["requests"]
    prompts = ["--prompts", str(files["root"] / "prompts.jsonl"), "--max-prompts", "3", "--max-new-tokens", "6",
               "--n-boot", "50", "--policy", f"short={files['short']},base={files['base']}", "--baseline", "base"]
    out = tmp_path / "verdict"
    assert main(["eval", *prompts, "--judge", "openai:verdict", "--judge-base-url", server + "/v1",
                 "--output-dir", str(out)]) == 0
    assert "3 of 3 verdicts read" in capsys.readouterr().out
    m = json.loads((out / "eval.json").read_text())["policies"]["short"]
    assert m["win_rate_vs_base"] == 0.5 and (m["judge_pairs"], m["judge_failures"]) == (3, 0)
    for s in _samples(out):
        if s["policy"] == "short":  # "A" in both orders: forward 1, backward 0
            assert (s["verdict"]["p_forward"], s["verdict"]["p_backward"]) == (1.0, 0.0)
            assert [r.strip() for r in s["verdict"]["replies"]] == [VERDICT, VERDICT]
    assert _get(server + "/stats")["requests"] - before == 3 * 2  # two orders per pair, no retries

    # the untrained model names no verdict: each pair is asked 1 + --judge-reply-retries times, then counted
    before = _get(server + "/stats")["requests"]
    out = tmp_path / "random"
    assert main(["eval", *prompts, "--judge", "openai:random", "--judge-base-url", server + "/v1",
                 "--judge-reply-retries", "1", "--output-dir", str(out)]) == 0
    assert "0 of 3 verdicts read" in capsys.readouterr().out
    m = json.loads((out / "eval.json").read_text())["policies"]["short"]
    assert m["win_rate_vs_base"] is None and (m["judge_pairs"], m["judge_failures"]) == (3, 3)
    assert all("names neither option" in s["verdict"]["error"] for s in _samples(out) if s["policy"] == "short")
    assert _get(server + "/stats")["requests"] - before == 3 * 2  # the first order fails twice per pair


# ------------------------------------------------------------------------------------------------- pipeline


def test_pipeline_stages_take_the_judge_options(files, tmp_path):
    """The RL stage takes --reward-judge / --reward-judge-reference and the eval stage a pairwise judge
    with the judge flags (judge_reply_retries, ...), by their underscored names."""
    import rlhfkit.stages  # noqa: F401  (registers the eval stage)
    from rlhfkit.pipeline import run_pipeline
    from rlhfkit.stage import stage_options

    assert {"judge_template", "judge_base_url", "judge_api_key_env", "judge_reply_retries"} <= \
        stage_options("eval")
    config = tmp_path / "c.yaml"
    config.write_text(f"""
output_dir: {tmp_path / 'run'}
defaults: {{progress_bar: false}}
stages:
  rloo: {{type: rloo, model: {files['base']}, dataset: {files['root'] / 'prompts.jsonl'},
         reward_judge: "{files['longer']}", reward_judge_reference: chosen, max_steps: 1, num_generations: 2,
         prompts_per_step: 2, max_new_tokens: 6}}
  eval: {{type: eval, policies: {{base: {files['base']}, rloo: "${{rloo}}"}}, baseline: base,
         prompts: {files['root'] / 'prompts.jsonl'}, judge: "{files['longer']}", judge_reply_retries: 0,
         max_new_tokens: 6, n_boot: 50, max_prompts: 2}}
""")
    results = run_pipeline(config, log=lambda _: None)
    m = results["eval"]["policies"]["rloo"]
    assert (m["judge_pairs"], m["judge_failures"]) == (2, 0) and m["judge_score"] is None
    samples = _samples(tmp_path / "run" / "eval")
    by = {(s["policy"], s["prompt_row"]): s["response"] for s in samples}
    assert m["win_rate_vs_base"] == pytest.approx(np.mean([_p_longer(by["rloo", i], by["base", i]) for i in (1, 2)]),
                                                  abs=1e-9)
