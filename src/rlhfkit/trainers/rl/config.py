"""The online trainers' options: one RLConfig, with PPO, GRPO, RLOO, GSPO and REINFORCE++ as its sets of defaults.

The rollout engine's options come from :class:`rlhfkit.rollout.options.RolloutOptions`; the Ray launcher
adds its own (:func:`rlhfkit.distributed.with_ray_options`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...engine import SharedPromptOptions, TrainConfig, arg
from ...errors import ConfigError
from ...losses import (
    GROUP_ADVANTAGE_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    KL_ESTIMATORS,
    REINFORCE_PP_TYPES,
    SCALE_REWARDS,
)
from ...rollout.options import REWARD_ENSEMBLES, RolloutOptions, check_rollout_options

ADVANTAGE_TYPES = ("gae",) + GROUP_ADVANTAGE_TYPES + REINFORCE_PP_TYPES
LOSS_AGGREGATIONS = ("token_mean", "sequence_mean", "dr_grpo", "bnpo")
KL_MODES = ("reward", "loss")
CRITICS = ("value_head", "reward_model")


@dataclass
class RLConfig(RolloutOptions, SharedPromptOptions, TrainConfig):
    """Settings shared by ``rlhfkit ppo``, ``grpo``, ``rloo``, ``gspo`` and ``reinforce_pp`` (they differ in
    defaults only)."""

    # data and batch shape
    max_prompt_length: int | None = arg(256, "Longest prompt in tokens (prompts keep their end).")
    prompts_per_step: int = arg(8, "Prompts sampled per step on each device.")
    num_generations: int = arg(1, "Responses sampled per prompt (the group size of GRPO / RLOO).")
    per_device_batch_size: int = arg(8, "Sequences per micro-batch in the update.")
    num_minibatches: int = arg(1, "Optimizer steps per pass over a rollout (the rollout is split in this many).")
    ppo_epochs: int = arg(1, "Passes over each rollout.")
    learning_rate: float = arg(1e-6, "Peak learning rate (AdamW).")
    lr_scheduler_type: str = arg("constant", "LR schedule after warm-up (stepped once per rollout).")
    # sampling
    temperature: float = arg(1.0, "Sampling temperature; the policy is also scored at this temperature.")
    top_k: int = arg(0, "Sample from the k most likely tokens (0 = off).")
    top_p: float = arg(1.0, "Nucleus sampling mass (1.0 = off).")
    max_new_tokens: int = arg(64, "Longest response in tokens.")
    stop_strings: str = arg("", "Comma-separated strings that end a response (kept, text after cut).")
    logprob_check_steps: int = arg(0, "Compare the rollout engine's log-probs of the sampled tokens with the "
                                   "trainer's forward: 0 = at the first step, N = every N steps (1, N+1, ...), "
                                   "-1 = never. Logged as rollout_logprob_diff_mean / _max and "
                                   "rollout_importance_ratio_mean.")
    logprob_check_tolerance: float = arg(0.1, "Stop the run when that mean |Δ log-prob| per response token exceeds "
                                         "this many nats (inf = log only).")
    missing_eos_penalty: float = arg(0.0, "Subtracted from the score of a response that did not end (no EOS "
                                     "or stop string within --max-new-tokens).")
    # reward
    reward_model: str | None = arg(None, "Reward model(s): hub id or path, comma-separated for an ensemble.")
    reward_fn: str | None = arg(None, "Reward function(s) 'path/to/file.py:function', comma-separated; called "
                                "as function(prompts, responses, **columns) -> list of floats: prompts = the "
                                "chat-rendered text, and every dataset column the function names (all with "
                                "**kwargs) as a keyword list, one value per response; prompt= is the prompt "
                                "as written. TRL-style functions (a 'completions' parameter) work too.")
    reward_url: str | None = arg(None, "HTTP reward endpoint(s) (POST {prompts, responses} -> {scores}).")
    reward_judge: str | None = arg(None, "A judge as a reward source (spec as in `rlhfkit eval --judge`). A scoring "
                                   "judge (model:, fn:, http:, gold:) scores each response; a pairwise judge (lm:, "
                                   "openai[:MODEL], pairfn:FILE.py:FN; asked in both orders) gives P(response better "
                                   "than --reward-judge-reference), or without one the mean P of beating each other "
                                   "sample of its group (G(G-1)/2 pairs per prompt, each asked in both orders: "
                                   "G(G-1) judge calls; needs --num-generations >= 2). Logged as reward/judge_mean; "
                                   "model judges read $RLHFKIT_JUDGE_BASE_URL / $RLHFKIT_JUDGE_API_KEY.")
    reward_judge_reference: str | None = arg(None, "Pairwise --reward-judge: the dataset column holding the "
                                             "response each sample is compared with (e.g. chosen, reference).")
    reward_ensemble: str = arg("mean", f"How several reward sources combine: {', '.join(REWARD_ENSEMBLES)}.")
    reward_weights: str | None = arg(None, "Comma-separated weights, one per reward source in the order "
                                     "--reward-model, --reward-fn, --reward-url, --reward-judge: the reward is Σ w_i·r_i (with "
                                     "--reward-ensemble mean only). Each source's mean is logged as reward/<name>.")
    reward_std_coef: float = arg(1.0, "k in mean − k·std for --reward-ensemble mean_minus_std.")
    reward_batch_size: int = arg(16, "Sequences per reward-model forward.")
    reward_normalize: bool = arg(False, "Normalise scores by a running mean/std (saved in checkpoints).")
    reward_clip: float = arg(0.0, "Clip (normalised) scores to [−c, c]; 0 = off.")
    # KL leash
    ref_model: str | None = arg(None, "Reference model (default: --model). With LoRA the reference is the "
                                "policy with its adapters disabled.")
    kl_coef: float = arg(0.05, "β: weight of the KL penalty (initial value when --kl-target is set).")
    kl_estimator: str = arg("k1", f"Per-token KL estimator: {', '.join(KL_ESTIMATORS)} (k1 = log π − log "
                            "π_ref, unbiased; k3 = always ≥ 0, lower variance).")
    kl_mode: str = arg("reward", "Where the KL goes: 'reward' (per-token penalty in the reward, classic "
                       "RLHF) or 'loss' (β·KL added to the loss, as GRPO does).")
    kl_target: float | None = arg(None, "Adaptive β (Ziegler et al.): target KL per response; unset = fixed β.")
    kl_horizon: int = arg(10000, "Adaptive β horizon in samples.")
    kl_coef_min: float | None = arg(None, "Adaptive β: the lowest β the controller may set (e.g. --kl-coef: it "
                                    "then only tightens, and --kl-target is a KL budget); unset = no floor.")
    kl_coef_from: str | None = arg(None, "Adaptive β: start at the β an earlier RL run's controller ended at (its "
                                   "folder's summary.json kl_coef_final; e.g. the last round's PPO in iterated "
                                   "RLHF, so the leash does not slacken between rounds); unset or '' = --kl-coef.")
    # advantages and losses
    advantage: str = arg("gae", f"Advantage estimator: {', '.join(ADVANTAGE_TYPES)}.")
    gamma: float = arg(1.0, "GAE discount γ.")
    lam: float = arg(0.95, "GAE λ.")
    whiten_advantages: bool = arg(True, "Whiten advantages over the rollout (mean 0, std 1).")
    clip_eps: float = arg(0.2, "PPO ratio clip ε.")
    clip_eps_high: float | None = arg(None, "Upper ratio clip (DAPO clip-higher); default = --clip-eps.")
    loss_aggregation: str = arg("token_mean", "token_mean (every token of the minibatch equal; DAPO), "
                                "sequence_mean (mean per response, then over responses; GRPO), dr_grpo "
                                "(token sum / max_new_tokens per response) or bnpo (token mean of each "
                                "micro-batch, then the mean over micro-batches and ranks; TRL's bnpo).")
    critic: str = arg("value_head", "PPO critic: value_head (a linear head on the policy's backbone) or "
                      "reward_model (a separate value model initialised from the first --reward-model).")
    vf_coef: float = arg(0.1, "Weight of the value loss.")
    value_clip: float = arg(0.2, "Clip range of the value loss around the rollout's values (0 = off).")
    entropy_coef: float = arg(0.0, "Entropy bonus weight.")
    approx_kl_stop: float | None = arg(None, "Stop the PPO epochs of a rollout once the approximate KL to the "
                                       "rollout policy exceeds this.")
    # later variants (issue 22): GSPO, GRPO's reward scaling, DAPO, truncated importance sampling
    importance_sampling_level: str = arg("token", "PPO ratio per token, or one per response: sequence = GSPO's "
                                         "exp(mean log-ratio over the response), clipped per response.")
    scale_rewards: str = arg("group", "--advantage grpo: divide by the group's reward std (group), the whole "
                             "batch's (batch) or not at all (none), as TRL's scale_rewards.")
    dynamic_sampling: bool = arg(False, "DAPO: drop groups whose rewards are all equal and refill the batch "
                                 "from further prompts (logged as dynamic_sampling_dropped / _rounds).")
    dynamic_sampling_max_rounds: int = arg(4, "DAPO: most extra sampling rounds per step; then the batch is "
                                           "topped up with dropped groups (zero group advantage).")
    overlong_buffer: int = arg(0, "DAPO overlong shaping: penalise a response linearly over its last N tokens "
                               "before --max-new-tokens (0 at the start of the buffer, -factor at the limit); 0 = off.")
    overlong_penalty_factor: float = arg(1.0, "DAPO overlong shaping: the penalty at --max-new-tokens.")
    mask_truncated: bool = arg(False, "DAPO: no loss on responses cut by --max-new-tokens (no EOS or stop string).")
    tis_cap: float = arg(0.0, "Truncated importance sampling: weight each token's policy-gradient loss by "
                         "min(π_trainer/π_rollout, C) when the rollout engine's log-probs are not the trainer's "
                         "(vLLM); C = this; 0 = off. Logged as tis_ratio_mean / _max.")
    # tools (multi-turn episodes, issue 24)
    tools: str | None = arg(None, "Tools the policy may call mid-response, 'path/to/file.py:fn1,fn2' (typed, "
                            "Google-style docstrings); offered in the prompt, run on <tool_call>, their answers "
                            "forced into the response and masked from every loss. Default: no tools.")
    max_turns: int = arg(3, "--tools: most tool calls per response (the next call ends the response). --env: "
                         "most turns the environment answers per episode (the episode ends after that step).")
    tool_timeout: float = arg(10.0, "--tools: seconds a call may run before it is killed (an error turn).")
    tool_max_chars: int = arg(2000, "--tools: longest tool answer in characters (the rest is cut, with a note).")
    env: str | None = arg(None, "Multi-turn environment 'path/to/file.py:ClassName' (or package.module:ClassName), "
                          "one instance per episode: reset(row) -> the opening user turn (row = the dataset row, "
                          "every column), step(text) -> (observation, reward, done) at the end of each policy turn "
                          "(EOS or stop string); observations are forced into the response as user turns, masked "
                          "from every loss. The reward is the sum of the turns' rewards (+ the score of "
                          "--reward-model/--reward-fn/--reward-url, then optional); PPO gets each turn's reward at "
                          "its last token. Errors in the environment are counted (env/errors), the episode's "
                          "return is 0. Works with --tools. Default: no environment.")
    # logging
    sample_steps: int = arg(10, "Write a few samples to OUTPUT_DIR/samples.jsonl every N steps.")
    num_logged_samples: int = arg(4, "Samples written each time.")
    eval_num_generations: int = arg(1, "Responses per eval prompt.")
    # reward hacking
    heldout_judge: str | None = arg(None, "An independent judge (spec as in `rlhfkit eval --judge`: a reward "
                                    "model folder, fn:FILE.py:FUNCTION, http:URL, gold:WORLD_DIR) that also "
                                    "scores the --eval-dataset responses at every evaluation: logged as "
                                    "eval_heldout_reward, fed to the reward-hacking detector, and the policy "
                                    "with the best held-out score is kept in OUTPUT_DIR/best_heldout.")
    hacking_window: int = arg(3, "Reward-hacking detector: evaluations averaged for smoothing.")
    hacking_min_drop: float = arg(0.1, "Reward-hacking detector: share of its gain the held-out score must give "
                                  "back (while the training reward rises) to count.")
    hacking_patience: int = arg(2, "Reward-hacking detector: consecutive suspicious evaluations to fire.")
    hacking_z: float = arg(2.0, "Reward-hacking detector: the held-out drop and the proxy's rise must each exceed "
                           "this many standard errors (of the difference of the smoothed means), so evaluation "
                           "noise alone, or drift under a flat proxy, does not fire it.")

    algorithm = "ppo"


@dataclass
class PPOConfig(RLConfig):
    ppo_epochs: int = arg(4, "Passes over each rollout.")
    learning_rate: float = arg(3e-6, "Peak learning rate (AdamW).")


@dataclass
class GRPOConfig(RLConfig):
    num_generations: int = arg(8, "Responses sampled per prompt (the group size).")
    prompts_per_step: int = arg(1, "Prompts sampled per step on each device.")
    advantage: str = arg("grpo", f"Advantage estimator: {', '.join(ADVANTAGE_TYPES)}.")
    kl_mode: str = arg("loss", "Where the KL goes: 'loss' (β·KL in the loss, GRPO) or 'reward'.")
    kl_estimator: str = arg("k3", f"Per-token KL estimator: {', '.join(KL_ESTIMATORS)}.")
    kl_coef: float = arg(0.04, "β: weight of the KL term.")
    whiten_advantages: bool = arg(False, "Whiten advantages over the rollout (the group baseline already "
                                  "centres them).")
    loss_aggregation: str = arg("sequence_mean", "token_mean (DAPO), sequence_mean (GRPO) or dr_grpo.")

    algorithm = "grpo"


@dataclass
class RLOOConfig(RLConfig):
    num_generations: int = arg(8, "Responses sampled per prompt (the group size, ≥ 2).")
    prompts_per_step: int = arg(1, "Prompts sampled per step on each device.")
    advantage: str = arg("rloo", f"Advantage estimator: {', '.join(ADVANTAGE_TYPES)}.")
    whiten_advantages: bool = arg(False, "Whiten advantages over the rollout.")
    loss_aggregation: str = arg("token_mean", "token_mean, sequence_mean or dr_grpo.")

    algorithm = "rloo"


@dataclass
class GSPOConfig(GRPOConfig):
    importance_sampling_level: str = arg("sequence", "One PPO ratio per response (GSPO), or per token.")
    clip_eps: float = arg(3e-4, "Ratio clip ε (GSPO's sequence ratios need small ranges).")
    clip_eps_high: float | None = arg(4e-4, "Upper ratio clip.")
    kl_coef: float = arg(0.0, "β: weight of the KL term (GSPO trains without one).")
    num_minibatches: int = arg(4, "Optimizer steps per pass over a rollout (the ratio moves from 1 only "
                               "after the first).")

    algorithm = "gspo"


@dataclass
class ReinforcePPConfig(RLConfig):
    advantage: str = arg("reinforce_pp", f"Advantage estimator: {', '.join(ADVANTAGE_TYPES)} (reinforce_pp_baseline "
                         "subtracts the group mean first; needs --num-generations >= 2).")
    kl_coef: float = arg(0.01, "β: weight of the per-token KL penalty in the reward.")
    whiten_advantages: bool = arg(False, "Whiten advantages again (REINFORCE++ already whitens over the batch).")

    algorithm = "reinforce_pp"


def check_config(config: RLConfig) -> None:
    """One-line ConfigErrors for settings that cannot work together, before anything loads."""
    choices = {"kl_estimator": KL_ESTIMATORS, "kl_mode": KL_MODES, "advantage": ADVANTAGE_TYPES,
               "loss_aggregation": LOSS_AGGREGATIONS, "critic": CRITICS, "reward_ensemble": REWARD_ENSEMBLES}
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                              f"not '{getattr(config, name)}'")
    for name, allowed in (("importance_sampling_level", IMPORTANCE_SAMPLING_LEVELS), ("scale_rewards", SCALE_REWARDS)):
        if getattr(config, name) not in allowed:
            raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                              f"not '{getattr(config, name)}'")
    floor = config.kl_coef_min
    if floor is not None and (config.kl_target is None or not 0 <= floor <= config.kl_coef):
        raise ConfigError("--kl-coef-min needs --kl-target and must be in [0, --kl-coef]")
    if config.kl_coef_from and config.kl_target is None:
        raise ConfigError("--kl-coef-from needs --kl-target (a fixed β has nothing to carry on)")
    if config.scale_rewards != "group" and config.advantage != "grpo":
        raise ConfigError("--scale-rewards applies to --advantage grpo only")
    if config.dynamic_sampling and (config.advantage in ("gae", "reinforce_pp") or config.num_generations < 2):
        raise ConfigError("--dynamic-sampling needs a group advantage (--num-generations >= 2 and --advantage "
                          "grpo, dr_grpo, rloo or reinforce_pp_baseline)")
    if config.dynamic_sampling_max_rounds < 0 or config.tis_cap < 0:
        raise ConfigError("--dynamic-sampling-max-rounds and --tis-cap must be >= 0")
    if not 0 <= config.overlong_buffer <= config.max_new_tokens:
        raise ConfigError("--overlong-buffer must be in [0, --max-new-tokens]")
    if config.advantage in ("grpo", "rloo", "reinforce_pp_baseline") and config.num_generations < 2:
        raise ConfigError(f"--advantage {config.advantage} needs --num-generations >= 2 (a group baseline)")
    for name in ("prompts_per_step", "num_generations", "num_minibatches", "ppo_epochs", "max_new_tokens"):
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if config.prompts_per_step * config.num_generations < config.num_minibatches:
        raise ConfigError("--num-minibatches is larger than the number of sequences per rollout")
    if config.kl_coef < 0:
        raise ConfigError("--kl-coef must be >= 0")
    check_rollout_options(config)
    sources = reward_specs(config)
    if config.reward_judge or config.reward_judge_reference:
        check_reward_judge(config)
    if sources:  # a run without any source fails where it is built, with its own message
        from ...rollout.rewards import check_reward_weights, parse_reward_weights  # torch: not for --help

        check_reward_weights(parse_reward_weights(config.reward_weights), sources, config.reward_ensemble)
    if config.tools:
        check_tool_options(config)
    if config.env:
        check_env_options(config)
    if config.logprob_check_steps < -1 or not config.logprob_check_tolerance > 0:
        raise ConfigError("--logprob-check-steps must be >= -1 and --logprob-check-tolerance > 0")


def build_kl_controller(config: RLConfig) -> Any:
    """The run's β controller. β at the first step: --kl-coef, or with --kl-coef-from the β the earlier run's
    controller ended at, never under --kl-coef-min. Read when the run starts (in a pipeline the earlier run
    does not exist when the pipeline is checked)."""
    from ...losses import AdaptiveKLController  # torch: not for --help

    floor = config.kl_coef_min
    return AdaptiveKLController(max(_carried_kl_coef(config), floor or 0.0), config.kl_target, config.kl_horizon,
                                floor)


def _carried_kl_coef(config: RLConfig) -> float:
    if not config.kl_coef_from:
        return config.kl_coef
    path = Path(config.kl_coef_from) / "summary.json"
    try:
        beta = json.loads(path.read_text(encoding="utf-8"))["kl_coef_final"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = f"no key {e}" if isinstance(e, KeyError) else type(e).__name__
        raise ConfigError(f"--kl-coef-from {config.kl_coef_from}: {path} gives no final β ({reason}); name "
                          "the folder of a finished rlhfkit PPO / GRPO / RLOO run") from None
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not math.isfinite(beta) or beta < 0:
        raise ConfigError(f"--kl-coef-from {config.kl_coef_from}: kl_coef_final in {path} is {beta!r}, "
                          "not a number >= 0")
    return float(beta)


def reward_specs(config: RLConfig) -> list[str]:
    """Every reward source's spec in the order of --reward-weights: models, functions, URLs, the judge."""
    return [s for text in (config.reward_model, config.reward_fn, config.reward_url) for s in (text or "").split(",")
            if s] + ([config.reward_judge] if config.reward_judge else [])


def check_reward_judge(config: RLConfig) -> None:
    """--reward-judge: a pairwise judge needs a reference column or groups (in training and evaluation)."""
    from ...judges.spec import is_pairwise_spec

    if not config.reward_judge:
        raise ConfigError("--reward-judge-reference needs --reward-judge")
    if not is_pairwise_spec(config.reward_judge):
        if config.reward_judge_reference:
            raise ConfigError(f"--reward-judge-reference needs a pairwise judge (lm:, openai:, pairfn:); "
                              f"'{config.reward_judge}' scores each response on its own")
        return
    if config.reward_judge_reference:
        return
    if config.num_generations < 2:
        raise ConfigError(f"--reward-judge {config.reward_judge} is pairwise: with --num-generations "
                          f"{config.num_generations} there is no group to compare with; give "
                          "--reward-judge-reference COLUMN (e.g. chosen)")
    if config.eval_dataset and config.eval_num_generations < 2:
        raise ConfigError("--reward-judge in group mode also scores evaluation responses against their group: "
                          "set --eval-num-generations >= 2 or give --reward-judge-reference COLUMN")


def check_tool_options(config: RLConfig) -> None:
    """--tools: what cannot carry tool episodes is refused, and the spec is loaded (its errors are cheap)."""
    if config.rollout_backend != "hf":
        raise ConfigError("--tools needs --rollout-backend hf (tool turns with vLLM are not supported yet)")
    if getattr(config, "prompt_format", "auto") == "raw":
        raise ConfigError("--tools needs chat prompts: tool turns are chat turns; drop --prompt-format raw")
    if config.max_turns < 0 or config.tool_timeout <= 0 or config.tool_max_chars < 1:
        raise ConfigError("--max-turns must be >= 0, --tool-timeout > 0 and --tool-max-chars >= 1")
    from ...rollout.tools import load_tools  # transformers: not for --help

    load_tools(config.tools)


def check_env_options(config: RLConfig) -> None:
    """--env: what cannot run environment episodes is refused, and the class is loaded (its errors are cheap)."""
    if config.rollout_backend != "hf":
        raise ConfigError("--env needs --rollout-backend hf (environment turns with vLLM are not supported yet)")
    if getattr(config, "prompt_format", "auto") == "raw":
        raise ConfigError("--env needs chat prompts: observations are user turns; drop --prompt-format raw")
    if config.max_turns < 1:
        raise ConfigError("--max-turns must be >= 1 with --env (the turns the environment answers)")
    if config.eval_dataset:
        raise ConfigError("--env: evaluation does not run environment episodes yet; drop --eval-dataset")
    from ...rollout.environments import load_environment  # transformers: not for --help

    load_environment(config.env)
