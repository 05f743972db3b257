"""The offline trainers' options (SFT, reward model, DPO), apart from their trainers so that ``--help`` and
the pipeline's checks read them without loading torch. The online trainers' options are in ``rl/config``."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.config import TrainConfig, arg
from ..losses.names import DPO_LOSS_TYPES


@dataclass
class SFTConfig(TrainConfig):
    learning_rate: float = arg(2e-5, "Peak learning rate (AdamW).")
    completion_only_loss: bool = arg(True, "Loss on completion / assistant tokens only; "
                                     "--no-completion-only-loss trains on every token.")


@dataclass
class RewardConfig(TrainConfig):
    learning_rate: float = arg(1e-5, "Peak learning rate (AdamW).")
    center_rewards_coef: float = arg(0.0, "Weight of the reward-centring penalty c·(r_chosen + r_rejected)²; "
                                     "0 disables it (try 0.01).")


@dataclass
class DPOConfig(TrainConfig):
    learning_rate: float = arg(5e-7, "Peak learning rate (AdamW); DPO wants small ones.")
    beta: float = arg(0.1, "β: strength of the implicit KL leash to the reference (higher = closer).")
    loss_type: str = arg("sigmoid", f"One of {', '.join(DPO_LOSS_TYPES)}.")
    label_smoothing: float = arg(0.0, "Assumed share of flipped labels (cDPO for sigmoid, rDPO for robust).")
    ref_model: str | None = arg(None, "Reference model (default: --model). With LoRA the reference is the "
                                "policy with its adapters disabled.")
    precompute_ref: bool = arg(False, "Compute reference log-probs once before training, cache them in "
                                "OUTPUT_DIR/ref_logps.pt and reuse them every epoch (and on resume).")
