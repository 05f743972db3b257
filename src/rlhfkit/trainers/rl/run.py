"""``run_rl``: load the models and the reward source, then let the engine run one rollout + update per step."""

from __future__ import annotations

import json
import math
from functools import partial
from typing import Any

from ...data import PROMPT_FORMATS, prepare_prompts
from ...engine import Engine
from ...errors import ConfigError
from ...judges.judge_reward import reward_judge_source
from ...judges.spec import load_judge
from ...models import check_same_tokenizer, load_causal_lm, load_reward_model, load_tokenizer
from ...models.attention import use_packed_attention
from ...models.dropout import apply_dropout_setting
from ...rollout.rewards import (
    ModelReward,
    build_reward_source,
    check_reward_columns,
    check_reward_weights,
    load_reward_function,
    parse_reward_weights,
)
from ...rollout.tool_prompts import start_tool_worker
from ...rollout.vllm_backend import build_rollout_backend
from ..common import lora_settings, prepare_datasets, prompt_sharing, resolve_packing, start_run
from .config import RLConfig, check_config, reward_specs
from .hacking import RewardHackingDetector
from .policy import ActorCritic
from .task import RLTask
from .watch import HeldoutWatch


def write_samples(engine: Engine, step: int, samples: list[dict]) -> None:
    """Append a few of a step's decoded samples to OUTPUT_DIR/samples.jsonl (main process only)."""
    if not engine.is_main or not samples:
        return
    with open(engine.output_dir / "samples.jsonl", "a", encoding="utf-8") as fh:
        for sample in samples:
            fh.write(json.dumps({"step": step, **sample}) + "\n")


def record_columns(records: list[dict]) -> list[str]:
    """``prompt`` and the other columns of prompt records (:func:`rlhfkit.data.prepare_prompts`)."""
    names = ["prompt"]
    for record in records:
        names += [k for k in record.get("columns") or {} if k not in names]
    return names


def check_reward_inputs(config: RLConfig, prompts: list[dict], eval_prompts: list[dict],
                        sources: list[Any] | None = None) -> None:
    """Before any model trains: one --reward-weights value per source, and every reward function finds the
    columns it requires in the training and evaluation prompts (``sources``: the built reward sources;
    None loads the --reward-fn functions alone, as the Ray driver does)."""
    check_reward_weights(parse_reward_weights(config.reward_weights), reward_specs(config), config.reward_ensemble)
    if sources is None:
        if config.reward_judge:
            raise ConfigError("--reward-judge does not run on Ray yet; drop --ray or use --reward-fn")
        sources = [load_reward_function(s) for s in (config.reward_fn or "").split(",") if s]
    for records, where in ((prompts, f"--dataset {config.dataset}"), (eval_prompts,
                                                                        f"--eval-dataset {config.eval_dataset}")):
        if records:
            check_reward_columns(sources, record_columns(records), where)


def run_rl(config: RLConfig) -> dict[str, Any]:
    """Train a policy online with PPO, GRPO, RLOO, GSPO or REINFORCE++ (set by the config class); returns the
    summary."""
    check_config(config)
    if getattr(config, "ray", False):
        raise ConfigError("ray=True runs on Ray: call rlhfkit.distributed.run_ray_rl (the CLI's --ray does)")
    engine = start_run(config)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    prepare = partial(prepare_prompts, max_prompt_length=config.max_prompt_length or config.max_length // 2)
    prompts, eval_prompts, report = prepare_datasets(config, tokenizer, PROMPT_FORMATS, prepare)

    if config.tools:  # the tools' worker process forks before any model is loaded: it holds none of them
        start_tool_worker(config.tools)
    # the reward source first: its configuration errors are cheap to find (optional with --env)
    optional = config.env and not reward_specs(config)
    judged = [reward_judge_source(config.reward_judge, tokenizer, engine.device, config.reward_judge_reference)] \
        if config.reward_judge else []
    reward = None if optional else build_reward_source(
        [s for s in (config.reward_model or "").split(",") if s],
        [s for s in (config.reward_fn or "").split(",") if s],
        [s for s in (config.reward_url or "").split(",") if s],
        tokenizer, device=engine.device, ensemble=config.reward_ensemble, std_coef=config.reward_std_coef,
        batch_size=config.reward_batch_size, trust_remote_code=config.trust_remote_code,
        weights=parse_reward_weights(config.reward_weights), extra_sources=judged)
    check_reward_inputs(config, prompts, eval_prompts, list(getattr(reward, "sources", [reward])))
    lora = lora_settings(config)
    policy = load_causal_lm(config.model, lora=lora, trust_remote_code=config.trust_remote_code)
    apply_dropout_setting(policy, config.keep_dropout, "policy")  # else pi/pi_old != 1 before any update
    policy.to(engine.device)
    ref_model = None
    if not lora.enabled or config.ref_model:
        ref_name = config.ref_model or config.model
        if config.ref_model and config.ref_model != config.model:
            check_same_tokenizer(tokenizer, load_tokenizer(config.ref_model), config.model, config.ref_model)
        ref_model = load_causal_lm(ref_name, trust_remote_code=config.trust_remote_code)
        apply_dropout_setting(ref_model, config.keep_dropout, "reference")

    critic = None
    value_model = None
    if config.advantage == "gae":
        critic = config.critic
        if critic == "reward_model":
            if not config.reward_model:
                raise ConfigError("--critic reward_model needs --reward-model (the value model starts from it)")
            value_model = load_reward_model(config.reward_model.split(",")[0],
                                            trust_remote_code=config.trust_remote_code).to(engine.device)
            apply_dropout_setting(value_model, config.keep_dropout, "value model")
    model = ActorCritic(policy, critic, value_model)
    packed = resolve_packing(config, policy) and (value_model is None or resolve_packing(config, value_model,
                                                                                         reward=True))
    if packed and ref_model is not None:
        use_packed_attention(ref_model)
    if ref_model is not None:
        ref_model = engine.prepare_frozen(ref_model)
    for source in getattr(reward, "sources", [reward]):  # reward models run like the reference
        if isinstance(source, ModelReward):
            source.model = engine.prepare_frozen(source.model)
    share = config.num_generations > 1 and prompt_sharing(config, packed, policy, ref_model, value_model)
    task = RLTask(config, tokenizer, packed, ref_model, reward, build_rollout_backend(config, tokenizer),
                  eval_prompts, share_prompts=share)
    task.engine = engine
    task.train_prompts = prompts
    checkpointed: list[Any] = [task.kl_controller, task.reward_stats]
    if config.heldout_judge:
        judge = load_judge(config.heldout_judge, tokenizer, engine.device)
        if eval_prompts:  # the held-out judge scores the eval prompts' responses
            check_reward_columns([judge], record_columns(eval_prompts), f"--eval-dataset {config.eval_dataset}")
        detector = RewardHackingDetector(config.hacking_window, config.hacking_min_drop,
                                         patience=config.hacking_patience, z=config.hacking_z)
        task.heldout = HeldoutWatch(judge, detector)
        checkpointed.append(task.heldout.detector)

    total_steps = config.max_steps if config.max_steps > 0 else max(
        math.ceil(config.num_epochs * len(prompts) / (config.prompts_per_step * engine.world_size)), 1)
    order_cache: dict[int, list[int]] = {}

    def step_fn(step: int) -> tuple[dict[str, Any], int]:
        chosen = engine.records_for(prompts, step, order_cache, batch_size=config.prompts_per_step)
        exp = task.rollout_step(engine, engine.model, chosen, step)
        train_row, _ = task.update(engine, exp.records, step)
        task.kl_controller.update(float(exp.kl_seq.mean()), len(exp.records))
        if config.sample_steps > 0 and (step + 1) % config.sample_steps == 0 or step == 0:
            write_samples(engine, step + 1, exp.samples)
        return {**exp.metrics, **train_row}, exp.tokens

    summary = engine.run(task, model, total_steps, step_fn, checkpoint_objects=checkpointed,
                         extra_logs=["samples.jsonl"])
    if task.heldout is not None:
        summary["hacking"] = task.heldout.summary()
    summary.update({"kl_coef_final": task.kl_controller.beta, "train_prompts": len(prompts),
                    "prompt_rows": report.total_rows, "packing": packed,
                    "shared_prompts": task.share_prompts, "algorithm": config.algorithm})
    engine.save_final(engine.trained_model, tokenizer, submodule="policy")
    engine.write_summary(summary)
    return summary
