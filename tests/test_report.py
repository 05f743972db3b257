"""The HTML report: built from fixture run folders (and one real PPO run), opened in headless Chromium with no
network; its plots must render (plotly SVG with drawn traces), untrusted text must stay text, bad input must
give one-line errors or counted warnings."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from html import escape as html_escape
from pathlib import Path

import pytest

from rlhfkit.cli import main
from rlhfkit.errors import RlhfkitError
from rlhfkit.report import build_report

CHROMIUM = "/usr/bin/chromium"
XSS = "<script>alert(1)</script>"
# plotly.js reaches no network by itself; this rule makes any attempt fail instead of waiting
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND"]


def _write_jsonl(path: Path, rows: list[dict], extra_lines: tuple[str, ...] = ()) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in extra_lines))


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def _offline_run(path: Path, task: str, steps: int, train: dict, evaluation: dict, every: int = 10) -> None:
    """metrics.jsonl + summary.json of an offline trainer: train/eval metric name -> f(step)."""
    rows = [{"step": 0, **{k: f(0) for k, f in evaluation.items()}}]
    for step in range(1, steps + 1):
        rows.append({"step": step, "epoch": step / steps, **{k: f(step) for k, f in train.items()},
                     "learning_rate": 1e-4 * (1 - step / steps), "grad_norm": 2.0 / (1 + step / 10)})
        if step % every == 0:
            rows.append({"step": step, **{k: f(step) for k, f in evaluation.items()}})
    _write_jsonl(path / "metrics.jsonl", rows)
    _write_json(path / "summary.json", {"task": task, "steps": steps, "wall_seconds": 12.5 * steps,
                                        **{k: f(steps) for k, f in evaluation.items()}})


def _rl_run(path: Path, beta: float, steps: int = 60, fired: int | None = None, best: int = 20) -> None:
    """An RL run whose proxy reward keeps rising while the held-out judge's score peaks and falls (β = 0);
    rows and summary as rlhfkit's RL trainer writes them with --heldout_judge."""
    rows = []
    for step in range(1, steps + 1):
        kl = (0.08 if beta == 0 else 0.03) * step
        row = {"step": step, "reward_mean": 0.2 + 0.5 * math.sqrt(kl), "reward_std": 0.3, "kl": kl, "beta": beta,
               "entropy": 7.5 - 0.02 * step, "clip_frac": 0.2, "approx_kl": 0.01, "policy_loss": -0.05,
               "value_loss": 0.3 / step, "loss": 0.1 / step, "response_length": 16 + step / 6,
               "learning_rate": 1e-5, "weird_metric": math.sin(step / 5)}
        rows.append(row)
        if step % 10 == 0:
            rows.append({"step": step, "eval_reward_mean": 0.2 + 0.5 * math.sqrt(kl), "eval_kl": kl,
                         "eval_response_length": 16 + step / 6,
                         "eval_heldout_reward": 0.2 + 0.6 * math.sqrt(kl) - 0.25 * kl,
                         "eval_hacking_detected": float(fired is not None and step >= fired)})
    summary = {"task": "ppo", "algorithm": "ppo", "steps": steps, "wall_seconds": 400.0,
               "hacking": {"fired": fired is not None, "fired_step": fired, "best_step": best,
                           "reason": "held-out reward fell 31% of its gain" if fired else None}}
    _write_jsonl(path / "metrics.jsonl", rows, extra_lines=('{"step": 61, "reward_mean": ',))  # a cut-off line
    _write_json(path / "summary.json", summary)


def write_pipeline(root: Path) -> Path:
    """A pipeline folder as the pipeline stage leaves it: stage runs, hacking runs, eval/, summary.json."""
    _offline_run(root / "sft", "sft", 40, {"loss": lambda s: 2.5 + 5 * math.exp(-s / 8),
                                           "token_accuracy": lambda s: 0.6 - 0.5 * math.exp(-s / 8)},
                 {"eval_loss": lambda s: 2.7 + 5 * math.exp(-s / 8),
                  "eval_perplexity": lambda s: math.exp(2.7 + 5 * math.exp(-s / 8))})
    _offline_run(root / "rm", "reward", 30, {"loss": lambda s: 0.69 - 0.01 * s, "accuracy": lambda s: 0.5 + s / 80},
                 {"eval_loss": lambda s: 0.69 - 0.008 * s, "eval_accuracy": lambda s: 0.5 + s / 90})
    _offline_run(root / "dpo", "dpo", 30,
                 {"loss": lambda s: 0.69 - 0.01 * s, "reward_accuracy": lambda s: 0.5 + s / 70,
                  "reward_margin": lambda s: 0.02 * s, "chosen_reward": lambda s: 0.01 * s,
                  "rejected_reward": lambda s: -0.01 * s, "chosen_logp": lambda s: -90 + s / 3,
                  "rejected_logp": lambda s: -95 - s / 3},
                 {"eval_loss": lambda s: 0.69 - 0.008 * s, "eval_reward_accuracy": lambda s: 0.5 + s / 90})
    _rl_run(root / "hacking" / "beta0", 0.0, fired=40)
    _rl_run(root / "hacking" / "beta0.1", 0.1, best=50)
    policies = {}
    for i, name in enumerate(("base", "sft", "ppo", "dpo")):
        win = (0.2, 0.5, 0.68, 0.62)[i]
        policies[name] = {"judge_score": 2.0 + i * 0.7, "win_rate_vs_sft": win, "win_rate_ci_low": win - 0.06,
                          "win_rate_ci_high": win + 0.06, "lc_win_rate": win - 0.02, "reward_mean": 0.5 * i,
                          "kl_to_ref": (0.0, 0.0, 6.1, 4.2)[i], "mean_length": 40 + 5 * i,
                          "harmful_refusal_rate": 0.1 * i, "benign_over_refusal_rate": 0.05 * i,
                          "hallucination_rate": 0.3 - 0.05 * i}
    del policies["base"]["lc_win_rate"]  # keys may be missing
    _write_json(root / "eval" / "eval.json", {"judge": "gold:world-v1", "baseline": "sft", "num_prompts": 200,
                                              "num_samples": 1, "policies": policies,
                                              "rm": {"rm_accuracy": 0.87, "rm_pairs": 400}})
    samples = []
    for p in range(3):
        for policy in policies:
            response = f"Answer {p} from {policy}.\nSecond line."
            if p == 0 and policy == "ppo":
                response = f"Sure! {XSS} & more"
            samples.append({"prompt": f"Question {p}: how do I <b>bake</b> bread?", "category": "helpful",
                            "policy": policy, "sample": 0, "response": response, "score": 0.1 * p,
                            "length": len(response.split())})
    _write_jsonl(root / "eval" / "samples.jsonl", samples)
    _write_json(root / "summary.json", {"sft": {"win_rate_vs_sft": 0.5}, "ppo": {"win_rate_vs_sft": 0.68,
                                        "kl_to_ref": 6.1}, "rm": {"gold_accuracy": 0.9}, "wall_seconds": 500})
    return root


def _strip_scripts(dom: str) -> str:
    """The DOM without <script> bodies (plotly.js itself mentions every class name it uses)."""
    return re.sub(r"<script\b[^>]*>.*?</script>", "", dom, flags=re.S)


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir, tmp_path_factory):
    """The fixture pipeline plus one real (short) PPO run as its ppo/ stage, and its report."""
    root = write_pipeline(tmp_path_factory.mktemp("pipeline"))
    files = tmp_path_factory.mktemp("ppo_data")
    (files / "reward.py").write_text("def count_e(prompts, responses):\n"
                                     "    return [r.count('e') / 4.0 for r in responses]\n")
    _write_jsonl(files / "prompts.jsonl", [{"prompt": f"Tell me about item {i}."} for i in range(16)])
    _write_jsonl(files / "eval.jsonl", [{"prompt": f"Describe thing {i}."} for i in range(4)])
    assert main(["ppo", "--model", str(tiny_model_dir), "--dataset", str(files / "prompts.jsonl"),
                 "--eval_dataset", str(files / "eval.jsonl"), "--output_dir", str(root / "ppo"),
                 "--reward_fn", f"{files / 'reward.py'}:count_e", "--max_steps", "4", "--eval_steps", "2",
                 "--sample_steps", "2", "--prompts_per_step", "2", "--num_generations", "2",
                 "--max_new_tokens", "8", "--learning_rate", "1e-3", "--num_threads", "1", "--no_progress_bar"]) == 0
    assert main(["report", str(root), "--output", str(root / "out" / "pipeline.html")]) == 0
    return root, root / "out" / "pipeline.html"


@pytest.fixture(scope="module")
def rendered(pipeline, tmp_path_factory):
    """The pipeline report opened in headless Chromium with no network: its DOM after scripts ran, a
    screenshot and Chromium's log (console messages included)."""
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} not found: the browser test needs Debian's chromium "
                    f"(apt-get install -y chromium; .ci/run installs it)")
    _, report = pipeline
    work = tmp_path_factory.mktemp("chromium")
    png = work / "report.png"
    try:
        proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={work / 'profile'}",
                               "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
                               "--window-size=1280,2400", f"--screenshot={png}", "--dump-dom", report.as_uri()],
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{CHROMIUM} did not finish {report} in 60 s: an alert() from unescaped text blocks a "
                    f"headless browser")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return report.read_text(encoding="utf-8"), proc.stdout, png, proc.stderr


def test_report_is_self_contained_and_every_plot_renders_in_chromium(rendered):
    html, dom, _, log = rendered
    assert re.search(r"<script[^>]+src=|<link\b", html) is None  # nothing to fetch: plotly.js is inline
    emitted = html.count("Plotly.newPlot(")
    # eval bars, hacking, 4 comparisons, sft 5, rm 4, dpo 6, ppo >= 10, 2 hacking runs x 10
    assert emitted >= 45, emitted
    assert len(re.findall(r"<script\b", html)) == emitted + 1  # plotly.js once, then one small call per plot
    body = _strip_scripts(dom)
    plots = re.findall(r'<div id="plot-\d+" class="[^"]*\bjs-plotly-plot\b', body)
    assert len(plots) == emitted
    assert len(re.findall(r'<svg class="main-svg"', body)) >= emitted
    assert "Uncaught" not in log, [line for line in log.splitlines() if "CONSOLE" in line][:5]
    # traces are drawn: line paths with coordinates, bars with shapes, legend entries written by plotly
    lines = re.findall(r'<path class="js-line" d="M[\d.,-]+L', body)
    assert len(lines) >= 2 * emitted, len(lines)
    bars = re.findall(r'<g class="point"><path d="M[\d.,-]+V', body)
    assert len(bars) >= 4 * 6, len(bars)  # 4 policies in each of the 6 metric groups (one value missing)
    titles = set(re.findall(r'class="gtitle"[^>]*>([^<]+)<', body))
    assert {"Reward", "KL to reference", "β (KL coefficient)", "Entropy", "Loss", "Response length",
            "Reward against KL", "Accuracy", "Implicit rewards and margin",
            "Proxy and held-out reward against √KL: hacking"} <= titles, titles
    legend = set(re.findall(r'class="legendtext"[^>]*>([^<]+)<', body))
    assert {"hacking/beta0: hacking detected (step 40)", "hacking/beta0: best step (step 20)",
            "hacking/beta0.1: held-out reward", "hacking/beta0.1: best step (step 50)",
            "base", "sft", "ppo", "dpo"} <= legend, legend
    assert not any(text.startswith("hacking/beta0.1: hacking detected") for text in legend)
    assert {"Win rate vs sft", "Rates", "weird_metric"} <= set(re.findall(r'data-unformatted="([^"]+)"', body))
    # the pipeline summary's long tables are folded, so the overview does not push the plots down
    folded = re.search(r"<details><summary>Pipeline summary \(3 stage\(s\), 1 run-level value\(s\)\)</summary>"
                       r"(.*?)</details>", html, flags=re.S)
    assert folded is not None, "pipeline summary not folded"
    assert "gold_<wbr>accuracy" in folded.group(1) and "8m 20s (500 s)" in folded.group(1)


def test_untrusted_text_stays_text(rendered):
    html, dom, _, _ = rendered
    body = _strip_scripts(dom)
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp;amp; more" not in body  # escaped once, not twice
    assert "Sure! &lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in body
    assert "<script>alert(1)" not in dom and "<script>alert(1)" not in html
    assert "Question 0: how do I &lt;b&gt;bake&lt;/b&gt; bread?" in body
    # the CI columns fold into the win rate: "0.68 [0.62, 0.74]"
    assert re.search(r'<td><span class="ci"><span class="num">0\.68</span> <span[^>]*>\[0\.62, 0\.74\]</span>', body)


def test_screenshot_shows_the_plots(rendered):
    from PIL import Image

    from rlhfkit.report.figures import COLORS

    _, _, png, _ = rendered
    image = Image.open(png).convert("RGB")
    assert image.size == (1280, 2400)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200  # not a blank page
    counts = {rgb: n for n, rgb in colours}
    # the evaluation's bars, filled with the first four policy colours, are on the first screen
    for hex_colour in COLORS[:4]:
        rgb = tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
        assert counts.get(rgb, 0) > 2000, (hex_colour, counts.get(rgb, 0))


def test_single_real_run_report_plots_its_metrics(pipeline):
    from rlhfkit.report.figures import reward_vs_kl, run_panels
    from rlhfkit.report.runs import load

    root, _ = pipeline
    run_dir = root / "ppo"
    assert main(["report", str(run_dir)]) == 0
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and html.count("<tr>") > len(samples) // 2
    first = next(s for s in samples if s["response"].strip())
    assert html_escape(first["response"], quote=True) in html
    (run,) = load(run_dir).runs
    assert run.is_rl and run.eval_rows == 3  # steps 0, 2, 4
    panels = {p.figure.layout.title.text: p.figure for p in run_panels(run)}
    assert {"Reward", "KL to reference", "β (KL coefficient)", "Entropy", "Loss", "Response length",
            "Other metrics (dashed: evaluation)"} <= set(panels)
    reward = {t.name: t for t in panels["Reward"].data}
    assert list(reward["reward_mean"].y) == [r["reward_mean"] for r in rows if "reward_mean" in r]
    assert list(reward["eval_reward_mean"].x) == [r["step"] for r in rows if "eval_reward_mean" in r]
    scatter = reward_vs_kl(run).figure
    assert list(scatter.data[0].customdata) == [r["step"] for r in rows if "kl" in r]


def test_missing_or_empty_directory_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(RlhfkitError, match=f"{re.escape(str(tmp_path / 'nope'))}: no such directory"):
        build_report(tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(RlhfkitError, match=re.escape(str(tmp_path / "empty")) + ": no metrics.jsonl"):
        build_report(tmp_path / "empty")
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path / "empty") in err and err.startswith("rlhfkit report: error:")
    assert not (tmp_path / "empty" / "report.html").exists()


def test_output_never_replaces_a_file_that_is_not_a_report(tmp_path, capsys):
    run = tmp_path / "run"
    _write_jsonl(run / "metrics.jsonl", [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}])
    _write_json(run / "summary.json", {"steps": 2})
    summary = (run / "summary.json").read_bytes()
    # --output RUN/summary.json (a slip): refused in one line, the run's summary left as it was
    assert main(["report", str(run), "--output", str(run / "summary.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"rlhfkit report: error: {run / 'summary.json'} exists and is not an rlhfkit report; it is left " \
                  "as it is: choose another --output"
    assert (run / "summary.json").read_bytes() == summary
    assert main(["report", str(run), "-o", str(run)]) == 2 and "is a folder" in capsys.readouterr().err
    # an earlier report (the default path, or any file it wrote) is rewritten
    first = build_report(run)
    assert build_report(run) == first and build_report(run, first) == first
    elsewhere = build_report(run, tmp_path / "out" / "r.html")
    assert build_report(run, elsewhere) == elsewhere


def test_malformed_lines_are_counted_and_skipped_and_odd_keys_still_render(tmp_path, caplog):
    from rlhfkit.report.figures import eval_bars
    from rlhfkit.report.runs import load

    run = tmp_path / "run"
    _write_jsonl(run / "metrics.jsonl", [{"step": 1, "loss": 2.0, "novel_metric": 5.0}])
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 2, "loss": \n[1, 2]\n{"step": 3, "loss": 1.5, "eval_novel_metric": 4.0, "note": "x"}\n')
    (run / "summary.json").write_text("{not json")
    _write_json(tmp_path / "eval" / "eval.json", {"policies": {"a": {"novelty": 0.3}, "b": {}, "c": "n/a"},
                                                  "extra": {"deep": {"x": 1}}})
    _write_jsonl(tmp_path / "eval" / "samples.jsonl", [{"policy": "a", "response": "hi"}, {"prompt": "p"}])
    with caplog.at_level("WARNING", logger="rlhfkit"):
        out = build_report(tmp_path)
    messages = [r.getMessage() for r in caplog.records]
    assert f"{run / 'metrics.jsonl'}: skipped 2 malformed lines (line 2, 3)" in messages
    assert any(m.startswith(f"{run / 'summary.json'}: line 1: invalid JSON") for m in messages)
    data = load(tmp_path)
    series = data.runs[0].series
    assert series["loss"].steps == [1, 3] and series["loss"].values == [2.0, 1.5]
    assert series["eval_novel_metric"].values == [4.0] and "note" not in series
    bars = eval_bars(data.evaluations[0]).figure
    assert [a.text for a in bars.layout.annotations] == ["novelty"]
    html = out.read_text(encoding="utf-8")
    assert out == tmp_path / "report.html"
    assert "skipped 2 malformed lines (line 2, 3)" in html and "deep.x" in html
    assert "Other metrics (dashed: evaluation)" in html and "novel_metric" in html


def test_long_runs_are_thinned_but_keep_their_last_step(tmp_path):
    from rlhfkit.report.figures import MAX_POINTS, run_panels
    from rlhfkit.report.runs import load

    _write_jsonl(tmp_path / "metrics.jsonl", [{"step": s, "loss": 1 / s} for s in range(1, 10_002)])
    (run,) = load(tmp_path).runs
    (loss,) = run_panels(run)[0].figure.data
    assert len(loss.x) <= MAX_POINTS and loss.x[-1] == 10_001 and loss.y[-1] == 1 / 10_001
    assert list(loss.x[:3]) == [1, 4, 7]  # every third step


def test_hacking_verdict_comes_from_the_summary_or_else_the_metrics_rows():
    from rlhfkit.report.runs import Run

    rows = [{"step": 10, "eval_hacking_detected": 0.0}, {"step": 20, "eval_hacking_detected": 1.0},
            {"step": 30, "eval_hacking_detected": 1.0}]
    assert Run("r", Path("r"), rows, {}, []).hacking() == {"fired_step": 20}
    summary = {"hacking": {"fired": True, "fired_step": 30, "best_step": 10}}
    assert Run("r", Path("r"), rows, summary, []).hacking() == summary["hacking"]
    assert Run("r", Path("r"), rows[:1], {}, []).hacking() == {}


if __name__ == "__main__":  # write the fixture pipeline to a folder to look at its report by hand
    print(write_pipeline(Path(sys.argv[1])))


def test_chat_prompts_show_as_role_lines():
    from rlhfkit.report.build import _prompt_text

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<b>Hi</b>"}]
    assert _prompt_text(chat) == "system: Be brief.\nuser: <b>Hi</b>"
    assert _prompt_text("plain prompt") == "plain prompt"
    assert _prompt_text([1, 2]) == "[1, 2]"


def test_overview_fills_wall_time_and_names_what_its_columns_count(tmp_path):
    """Wall time from summary.json (trainers write wall_seconds) or else the pipeline's stage_done.json; the
    overview's columns say what they count (optimizer steps, logged training steps, evaluations)."""
    rows = [{"step": 0, "eval_loss": 2.0}, {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5},
            {"step": 2, "eval_loss": 1.4}]
    _write_jsonl(tmp_path / "sft" / "metrics.jsonl", rows)
    _write_json(tmp_path / "sft" / "summary.json", {"task": "sft", "steps": 2, "wall_seconds": 12.5})
    _write_jsonl(tmp_path / "rm" / "metrics.jsonl", rows)
    _write_json(tmp_path / "rm" / "summary.json", {"task": "reward", "steps": 2})  # written before wall time
    _write_json(tmp_path / "rm" / "stage_done.json", {"type": "rm", "summary": {"wall_seconds": 75.0}})
    html = build_report(tmp_path).read_text(encoding="utf-8")
    overview = html[html.index('<section id="overview">'):]
    overview = overview[:overview.index("</section>")]
    headers = re.findall(r"<th>(.*?)</th>", overview)
    assert headers == ["run", "task", "optimizer steps", "logged training steps", "evaluations", "wall time",
                       "final held-out metrics"]
    cells = {}
    for row in re.findall(r"<tr>(.*?)</tr>", overview[overview.index("<tbody>"):], flags=re.S):
        values = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)]
        cells[values[0]] = values
    assert cells["sft"][2:6] == ["2", "2", "2", "12.5 s"]
    assert cells["rm"][5] == "1m 15s"
