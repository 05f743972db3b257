"""The trained modules of an online run: the policy and its critic, and the policy's tempered log-probs."""

from __future__ import annotations

from typing import Any

import torch

from ...losses import selected_token_logprobs
from ...models.forward import (
    at_loss_positions,
    enable_activation_checkpointing,
    forward_inputs,
    loss_logits,
    loss_targets,
    reward_parts,
)


class ActorCritic(torch.nn.Module):
    """The trained modules: the policy and, for PPO, a critic (value head on the policy, or a value model).

    ``forward`` returns (logits, values-or-None) so distributed wrappers see a single forward call.
    ``policy=None`` with a value model is a critic alone (the critic group of a Ray run): logits are None.
    """

    def __init__(self, policy: torch.nn.Module | None, critic: str | None,
                 value_model: torch.nn.Module | None = None):
        super().__init__()
        self.policy = policy
        self.critic_kind = critic
        self.value_head = None
        self.value_model = value_model
        if critic == "value_head":
            hidden = policy.get_input_embeddings().embedding_dim
            self.value_head = torch.nn.Linear(hidden, 1)
            torch.nn.init.zeros_(self.value_head.weight)  # values start at 0: no random critic noise
            torch.nn.init.zeros_(self.value_head.bias)

    def activation_checkpointing_enable(self, **_: Any) -> None:
        for model in (self.policy, self.value_model):
            if model is not None:
                enable_activation_checkpointing(model)

    def forward(self, batch: dict[str, Any], with_logits: bool = True) -> tuple[torch.Tensor | None,
                                                                                  torch.Tensor | None]:
        logits = values = None
        if self.policy is not None and (with_logits or self.value_head is not None):
            logits, out = loss_logits(self.policy, batch, output_hidden_states=self.value_head is not None)
            if self.value_head is not None:
                values = self.value_head(out.hidden_states[-1]).squeeze(-1)
        if self.value_model is not None:
            backbone, head = reward_parts(self.value_model)
            values = head(backbone(**forward_inputs(batch)).last_hidden_state).squeeze(-1)
        return logits, values


def tempered_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """float32 logits divided by the sampling temperature (the distribution the rollout sampled from)."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def response_logps(logits: torch.Tensor, batch: dict[str, Any], temperature: float) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
    """Log-probs of the response tokens at ``temperature``, flat [n] in (sequence, position) order, from the
    predicting logits [n, V] of ``loss_logits``; and those logits (float32, tempered)."""
    picked = tempered_logits(logits, temperature)
    return selected_token_logprobs(picked, loss_targets(batch)), picked


def rollout_forwards(engine: Any, model: Any, batches: Any, reference: Any, recompute: bool,
                     temperature: float) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """One pass over a rollout's collated ``batches`` in eval mode: the reference log-probs (``reference(model,
    batch)``), the critic's values where the model has one and, with ``recompute``, the trainer's own log-probs
    of the sampled tokens; each a list of flat float32 CPU tensors, one per batch."""
    ref_flat, value_flat, own_flat = [], [], []
    model.eval()
    for batch in batches:
        batch = {k: v.to(engine.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with engine.accelerator.autocast():
            ref_flat.append(reference(model, batch).float().cpu())
            if model.critic_kind is not None or recompute:
                with torch.no_grad():
                    logits, values = model(batch, with_logits=recompute)
                if recompute:
                    own_flat.append(response_logps(logits, batch, temperature)[0].float().cpu())
                if values is not None:
                    value_flat.append(at_loss_positions(values, batch).float().cpu())
    model.train()
    return ref_flat, value_flat, own_flat
