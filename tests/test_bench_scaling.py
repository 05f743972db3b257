"""The scaling bench's arithmetic (bench/bench_scaling.py): the useful FLOPs it credits per token equal what
torch's FLOP counter sees in a real forward + backward, and its table and plot read the point files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from bench_scripts import load_bench_script


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("bench_scaling")


def _counted(model, ids, backward: bool) -> tuple[float, float]:
    """(matmul FLOPs, attention FLOPs) torch's counter sees for one forward (+ backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = model(input_ids=ids)
        value = out.logits.float().sum() if hasattr(out, "logits") else out[0].sum()
        if backward:
            value.backward()
    by_op = counter.get_flop_counts()["Global"]
    # eager attention: the score and value products are batched matmuls; every projection is an mm
    attention = sum(v for op, v in by_op.items() if "bmm" in str(op))
    return sum(by_op.values()) - attention, attention


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_flops_per_token_match_torchs_counter(bench, stage, tmp_path):
    """6 x matmul parameters per token (head included for an LM, not for an RM), and attention at half the
    counter's full T x T products (causal), for a sequence of T tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        pad_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    shape = bench.flop_shape(tmp_path)
    assert shape["head_params"] == 64 * 512 and shape["layers"] == 2
    model = (LlamaForCausalLM if stage == "sft" else LlamaForSequenceClassification)(
        LlamaConfig(**{**config.to_dict(), "num_labels": 1})
    )
    model.set_attn_implementation("eager")
    tokens = 48
    ids = torch.randint(1, 512, (1, tokens))
    matmuls, attention = _counted(model, ids, backward=True)
    per_token = bench.flops_per_token(stage, shape, t_eff=tokens)
    assert attention > 0
    # the counter counts the whole T x T score matrix; a causal model needs half of it
    assert matmuls + attention / 2 == pytest.approx(per_token * tokens, rel=0.01)
    if stage == "sft":  # the frozen reference's forward: a third of a training step
        ref_matmuls, ref_attention = _counted(model, ids, backward=False)
        dpo = bench.flops_per_token("dpo", shape, t_eff=tokens) * tokens
        assert dpo == pytest.approx(matmuls + attention / 2 + ref_matmuls + ref_attention / 2, rel=0.01)


def _point(size, band, batch, ours, trl, shape):
    results = [
        {"stage": "sft", "library": lib, "s_per_step": 1.0, "tokens_per_s": tps, "peak_rss_mib": rss}
        for lib, (tps, rss) in (("rlhfkit", ours), ("trl", trl))
    ]
    return {
        "size": size,
        "band": band,
        "batch": batch,
        "min_tokens": 16,
        "max_tokens": 256,
        "shape": shape,
        "ceiling_gflops": 10.0,
        "offline": {"results": results, "data": {"t_eff": {"sft": 100.0}}},
    }


def test_table_and_plot_from_point_files(bench, tmp_path):
    shape = {"layer_matmul_params": 1_000_000, "head_params": 500_000, "layers": 2, "hidden": 64}
    files = []
    for size, ours, trl in (("5M", (3000, 800), (2000, 900)), ("30M", (900, 1500), (600, 1400))):
        path = tmp_path / f"point-{size}-short.json"
        path.write_text(json.dumps(_point(size, "short", 16, ours, trl, shape)))
        files.append(str(path))
    points = [json.loads(Path(f).read_text()) for f in files]
    table = bench.build_table(points, 10.0)
    rows = [line for line in table.splitlines() if line.startswith("| 5M") or line.startswith("| 30M")]
    assert len(rows) == 2
    assert "| 1.50× |" in rows[0] and "| 1.50× |" in rows[1]
    per_token = 6 * 1_500_000 + 6 * 2 * 64 * 100.0
    assert f"| {3000 * per_token / 1e10:.0%} | {2000 * per_token / 1e10:.0%} |" in rows[0]
    online = [{"algo": "grpo", "library": lib, "s_per_step": sps, "gen_s_per_step": gen, "peak_rss_mib": 700.0}
              for lib, sps, gen in (("rlhfkit", 1.5, 0.7), ("rlhfkit-eager", 2.0, 1.2), ("trl", 2.4, 1.6))]
    points[0]["online"] = {"results": online}
    row = next(line for line in bench.build_table(points, 10.0).splitlines() if line.startswith("| 5M | GRPO"))
    assert row.startswith("| 5M | GRPO | 1.50 (0.70) | 2.00 (1.20) | 2.40 (1.60) | 1.60× | 1.20× |")
    plot = tmp_path / "scaling.png"
    bench.plot(points, 10.0, plot)
    assert plot.stat().st_size > 1000


def test_a_rerun_of_some_stages_keeps_the_others_with_their_own_ceiling(bench):
    """``--stages sft`` on a measured point: SFT's rows are the rerun's, RM's stay, and each row's FLOP share is
    of the ceiling measured in the run that measured it; a second rerun merges the same way."""
    shape = {"layer_matmul_params": 1_000_000, "head_params": 500_000, "layers": 2, "hidden": 64}
    first = _point("30M", "long", 1, (100, 200), (50, 150), shape) | {"ceiling_gflops": 50.0}
    first["offline"]["results"] += [{**r, "stage": "rm"} for r in first["offline"]["results"]]
    rerun = _point("30M", "long", 1, (120, 200), (80, 150), shape) | {"ceiling_gflops": 80.0}
    merged = bench.merge_point(first, rerun)
    by = {(r["stage"], r["library"]): r for r in merged["offline"]["results"]}
    assert len(by) == len(merged["offline"]["results"]) == 4
    assert by["sft", "rlhfkit"]["tokens_per_s"] == 120 and by["rm", "rlhfkit"]["tokens_per_s"] == 100
    rows = {r["stage"]: r for r in bench.offline_rows(merged, 10.0)}
    assert rows["sft"]["rlhfkit"]["ceiling_gflops"] == 80.0 and rows["rm"]["rlhfkit"]["ceiling_gflops"] == 50.0
    assert rows["sft"]["rlhfkit"]["flop_share"] == pytest.approx(120 * bench.flops_per_token("sft", shape, 100.0) / 80e9)
    assert rows["rm"]["rlhfkit"]["flop_share"] == pytest.approx(100 * bench.flops_per_token("rm", shape, 136.0) / 50e9)
    again = bench.merge_point(merged, _point("30M", "long", 1, (130, 200), (90, 150), shape) | {"ceiling_gflops": 70.0})
    rows = {r["stage"]: r for r in bench.offline_rows(again, 10.0)}
    assert [rows[s]["rlhfkit"]["ceiling_gflops"] for s in ("sft", "rm")] == [70.0, 50.0]
    assert "50.0–70.0 GFLOP/s" in bench.build_table([again], 10.0)
