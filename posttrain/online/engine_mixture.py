"""Sampling from the geometric mixture of the policy and the reference policy (Nash-MD's opponent; XPO's
reference samples are its ``mixture_coef=1`` case).

The mixture of Munos et al. 2023 ("Nash Learning from Human Feedback", arXiv:2312.00886, Sec. 6) is taken per
token: ``p_m(y_t | x, y_<t) ∝ pi(y_t | .)^(1-m) * ref(y_t | .)^m``, i.e. ``softmax((1-m) z_pi + m z_ref)`` of
the two models' logits (the log-normalizers cancel). `MixtureEngine` is the HF engine with a sampler that
adds the reference's logits to the policy's at every step: the reference runs incrementally beside the
policy's decode loop on its own KV cache, so one rollout costs one policy and one reference decode, and the
temperature, top-k/top-p/min-p and the reported log-probs apply to the mixture (the engines' convention).

The reference is ``ref_model``, or without one the policy with its PEFT adapters disabled (no second copy).
vLLM has no per-token hook for a second model's logits, so the mixture always samples here, on the
training model, whatever engine samples the policy (``use_vllm`` keeps vLLM for the policy's completions).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..models import adapters_disabled, is_peft_model
from .engine_hf import HFEngine, SamplingProcessor
from .engines import Rollout, SamplingParams

__all__ = ["MixtureEngine", "MixtureSampler"]


class _IncrementalLM:
    """A causal LM fed the same rows as the decode loop, one new token per step, on its own KV cache;
    returns the last position's logits ``[B, V]`` (float32)."""

    def __init__(self, forward: Callable[..., Any], attention_mask: Tensor) -> None:
        self.forward, self.mask, self.cache = forward, attention_mask, None
        self.positions = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
        self.fed = 0

    def logits(self, input_ids: Tensor) -> Tensor:
        if self.cache is None:
            out = self.forward(input_ids=input_ids, attention_mask=self.mask, position_ids=self.positions,
                               use_cache=True, logits_to_keep=1)
        else:
            if input_ids.shape[1] != self.fed + 1:
                raise RuntimeError(f"the mixture sampler expected {self.fed + 1} tokens per row, got "
                                   f"{input_ids.shape[1]}: it must see every step of the decode")
            self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
            self.positions = self.positions[:, -1:] + 1
            out = self.forward(input_ids=input_ids[:, -1:], attention_mask=self.mask, position_ids=self.positions,
                               past_key_values=self.cache, use_cache=True)
        self.cache, self.fed = out.past_key_values, input_ids.shape[1]
        return out.logits[:, -1].float()


class MixtureSampler(SamplingProcessor):
    """`SamplingProcessor` on ``(1 - m) * policy_logits + m * ref_logits`` (the normalized geometric mixture)."""

    def __init__(self, params: SamplingParams, prompt_length: int, reference: _IncrementalLM, coef: float) -> None:
        super().__init__(params, prompt_length)
        self.reference, self.coef = reference, coef

    def draw(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        ref = self.reference.logits(input_ids)
        return super().draw(input_ids, scores.float().mul_(1.0 - self.coef).add_(ref, alpha=self.coef))


class MixtureEngine(HFEngine):
    """Completions from ``pi^(1-m) ref^m`` per token, ``m = mixture_coef`` (settable between rollouts).

    ``m = 0`` is the policy (plain HF engine), ``m = 1`` the reference alone (one decode, no policy forward).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, ref_model: nn.Module | None = None,
                 mixture_coef: float = 0.5, **kwargs: Any) -> None:
        super().__init__(model, tokenizer, **kwargs)
        if ref_model is None and not is_peft_model(model):
            raise ValueError("MixtureEngine needs a ref_model, or a PEFT policy whose disabled adapters are the reference")
        self.ref_model = ref_model
        self.mixture_coef = mixture_coef

    @property
    def mixture_coef(self) -> float:
        return self._coef

    @mixture_coef.setter
    def mixture_coef(self, value: float) -> None:
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"mixture_coef={value}: expected a number in [0, 1]")
        self._coef = float(value)

    def _reference_forward(self) -> Callable[..., Any]:
        """The reference's forward: ``ref_model``, or the policy with its adapters disabled for the call."""
        if self.ref_model is not None:
            return self.ref_model

        def forward(**kwargs: Any) -> Any:
            with adapters_disabled(self.model):
                return self.model(**kwargs)

        return forward

    def generate(self, prompts: Any, params: SamplingParams) -> Rollout:
        if self._coef < 1.0:
            return super().generate(prompts, params)
        policy = self.model
        if self.ref_model is not None:
            self.model = self.ref_model
            try:
                return super().generate(prompts, params)
            finally:
                self.model = policy
        with adapters_disabled(policy):
            return super().generate(prompts, params)

    def _sampler(self, params: SamplingParams, prompt_length: int, attention_mask: Tensor) -> SamplingProcessor:
        if self._coef == 0.0 or self._coef == 1.0:
            return super()._sampler(params, prompt_length, attention_mask)
        reference = _IncrementalLM(self._reference_forward(), attention_mask)
        return MixtureSampler(params, prompt_length, reference, self._coef)
