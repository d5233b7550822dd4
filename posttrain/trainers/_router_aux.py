"""The mixture-of-experts load-balancing loss (TRL's ``router_aux_loss_coef``), added to any method's loss.

A MoE model (its text config has ``output_router_logits``) returns ``aux_loss`` from its forward when asked for
router logits: the switch-transformer balancing term (Fedus et al. 2022) that keeps tokens spread over the
experts. As in TRL, ``router_aux_loss_coef=None`` takes the architecture's own coefficient (0 turns it off) and the
loss is on by default for a MoE model. posttrain's log-probs run the model for its hidden states and drop its
outputs, so `RouterAuxLoss` records ``aux_loss`` with a forward hook on the model (forwards with gradients only:
reference and old-policy passes run under ``no_grad``) and adds ``coef * mean(aux_loss)`` to the loss of the
``compute_loss`` call that ran them; the value is logged as ``aux_loss``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import torch

from ..ops import unwrap_model

logger = logging.getLogger(__name__)

__all__ = ["RouterAuxLoss"]


def _text_config(model: torch.nn.Module) -> Any:
    config = getattr(unwrap_model(model), "config", None)
    if config is None:
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class RouterAuxLoss:
    """Decides whether the router loss applies to ``model`` and collects it during a loss computation."""

    def __init__(self, model: torch.nn.Module, coef: float | None, owner: str) -> None:
        config = _text_config(model)
        is_moe = config is not None and hasattr(config, "output_router_logits")
        if coef not in (None, 0, 0.0) and not is_moe:
            logger.warning("%s: router_aux_loss_coef=%r has no effect: %s is not a mixture-of-experts model",
                           owner, coef, type(unwrap_model(model)).__name__)
        self.coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0) if coef is None else float(coef)
        self.enabled = is_moe and self.coef != 0.0
        self._pending: list[torch.Tensor] = []
        if is_moe:  # what the model computes follows the trainer's choice, whatever it was loaded with
            config.output_router_logits = self.enabled
            config.router_aux_loss_coef = self.coef
        if self.enabled:
            unwrap_model(model).register_forward_hook(self._record)

    def _record(self, _module: torch.nn.Module, _args: Any, output: Any) -> None:
        aux = getattr(output, "aux_loss", None)
        if aux is not None and torch.is_grad_enabled():
            self._pending.append(aux)

    def wrap(self, compute_loss: Callable[..., Any], store: Callable[[dict], None]) -> Callable[..., Any]:
        """``compute_loss`` with ``coef * aux_loss`` added to its loss (``store`` gets ``{"aux_loss": value}``)."""
        @functools.wraps(compute_loss)
        def with_router_loss(model: torch.nn.Module, inputs: Any, return_outputs: bool = False, **kwargs: Any) -> Any:
            self._pending.clear()
            result = compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            aux, self._pending = self._pending, []
            if not aux:
                return result
            value = torch.stack([a.float().reshape(()) for a in aux]).mean()
            store({"aux_loss": float(value.detach())})
            if return_outputs:
                loss, outputs = result
                return loss + self.coef * value.to(loss.device), outputs
            return result + self.coef * value.to(result.device)

        return with_router_loss
