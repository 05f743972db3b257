"""The offline trainers' options (SFT, reward model, DPO, KTO, SimPO / ORPO / CPO), apart from their trainers
so that ``--help`` and the pipeline's checks read them without loading torch. The online trainers' options
are in ``rl/config``."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.config import SharedPromptOptions, TrainConfig, arg
from ..losses.names import DPO_LOSS_TYPES


@dataclass
class SFTConfig(TrainConfig):
    learning_rate: float = arg(2e-5, "Peak learning rate (AdamW).")
    completion_only_loss: bool = arg(True, "Loss on completion / assistant tokens only; "
                                     "--no-completion-only-loss trains on every token.")


@dataclass
class RewardConfig(SharedPromptOptions, TrainConfig):
    learning_rate: float = arg(1e-5, "Peak learning rate (AdamW).")
    center_rewards_coef: float = arg(0.0, "Weight of the reward-centring penalty c·(r_chosen + r_rejected)²; "
                                     "0 disables it (try 0.01).")


@dataclass
class DPOConfig(SharedPromptOptions, TrainConfig):
    learning_rate: float = arg(5e-7, "Peak learning rate (AdamW); DPO wants small ones.")
    beta: float = arg(0.1, "β: strength of the implicit KL leash to the reference (higher = closer).")
    loss_type: str = arg("sigmoid", f"One of {', '.join(DPO_LOSS_TYPES)} (ipo_normalized / sigmoid_norm: "
                         "per-token log-ratios, as TRL's ipo / sigmoid_norm; apo_zero / apo_down: APO).")
    label_smoothing: float = arg(0.0, "Assumed share of flipped labels (cDPO for sigmoid, rDPO for robust).")
    ref_model: str | None = arg(None, "Reference model (default: --model). With LoRA the reference is the "
                                "policy with its adapters disabled.")
    precompute_ref: bool = arg(False, "Compute reference log-probs once before training, cache them in "
                                "OUTPUT_DIR/ref_logps.pt and reuse them every epoch (and on resume).")
    ld_alpha: float | None = arg(None, "LD-DPO: weight in [0, 1] of the log-probs of a response's tokens beyond "
                                 "the shorter response of its pair (policy and reference alike); unset = 1.")
    sync_ref_model: bool = arg(False, "TR-DPO: every --ref-model-sync-steps optimizer steps set the reference "
                               "to α·policy + (1−α)·reference (full training only; not with --precompute-ref).")
    ref_model_mixup_alpha: float = arg(0.6, "TR-DPO's α in (0, 1]; 1 = hard copy of the policy.")
    ref_model_sync_steps: int = arg(512, "TR-DPO's τ: optimizer steps between reference updates.")


@dataclass
class KTOConfig(TrainConfig):
    learning_rate: float = arg(5e-7, "Peak learning rate (AdamW); KTO, like DPO, wants small ones.")
    beta: float = arg(0.1, "β: strength of the implicit KL leash to the reference (higher = closer).")
    desirable_weight: float = arg(1.0, "λ_D: weight of the desirable rows' losses.")
    undesirable_weight: float = arg(1.0, "λ_U: weight of the undesirable rows' losses.")
    weight_balance: str = arg("warn", "When λ_D·n_D / (λ_U·n_U) is outside the paper's [1, 4/3]: warn, auto "
                              "(raise the rarer class's weight until the ratio is 1) or refuse.")
    ref_model: str | None = arg(None, "Reference model (default: --model). With LoRA the reference is the "
                                "policy with its adapters disabled.")
    precompute_ref: bool = arg(False, "Compute reference log-probs (rows and their mismatched KL pairs) once "
                               "before training, cache them in OUTPUT_DIR/ref_logps.pt and reuse them.")


@dataclass
class ReferenceFreeConfig(SharedPromptOptions, TrainConfig):
    """What the reference-free preference trainers (SimPO, ORPO, CPO) share: no reference model is loaded."""

    learning_rate: float = arg(1e-6, "Peak learning rate (AdamW).")


@dataclass
class SimPOConfig(ReferenceFreeConfig):
    beta: float = arg(2.0, "β: scale of the length-averaged log-prob reward.")
    simpo_gamma: float = arg(1.0, "γ: target reward margin (the SimPO code's gamma_beta_ratio is γ/β).")
    label_smoothing: float = arg(0.0, "Assumed share of flipped labels (cDPO-style smoothing).")
    cpo_alpha: float = arg(0.0, "Weight of the chosen response's per-token NLL; > 0 is CPO-SimPO.")


@dataclass
class ORPOConfig(ReferenceFreeConfig):
    beta: float = arg(0.1, "λ: weight of the odds-ratio term added to the SFT (NLL) loss.")


@dataclass
class CPOConfig(ReferenceFreeConfig):
    beta: float = arg(0.1, "β of the reference-free DPO term.")
    cpo_alpha: float = arg(1.0, "Weight of the behaviour-cloning term (the chosen response's per-token NLL).")
    label_smoothing: float = arg(0.0, "Assumed share of flipped labels (cDPO-style smoothing).")
