"""TRL 1.16 GRPOConfig fields beyond the shared online ones: the newer objectives and controls (each a pure
function in `posttrain.losses.grpo_objectives`), the sampler-correction names TRL uses
(``vllm_importance_sampling_*``, mapped onto posttrain's ``importance_sampling_*``), ``cast_lm_head_to_fp32``
and ``log_completions_hub_repo``."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["GRPOTRLFields", "VLLM_IS_MODES"]

VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class GRPOTRLFields:
    importance_sampling_level: str = field(default="token", metadata=_help(
        "'token': one importance ratio per token; 'sequence': GSPO's per-sequence geometric-mean ratio, with any "
        "loss_type's aggregation (loss_type='gspo' is the same with grpo's)."))
    sapo_temperature_pos: float = field(default=1.0, metadata=_help(
        "SAPO (loss_type='sapo') gate temperature for positive advantages."))
    sapo_temperature_neg: float = field(default=1.05, metadata=_help(
        "SAPO gate temperature for negative advantages (larger: off-policy negative updates fade faster)."))
    vespo_k_pos: float = field(default=2.0, metadata=_help("VESPO (loss_type='vespo') power for A >= 0."))
    vespo_lambda_pos: float = field(default=3.0, metadata=_help("VESPO decay for A >= 0."))
    vespo_k_neg: float = field(default=3.0, metadata=_help("VESPO power for A < 0."))
    vespo_lambda_neg: float = field(default=2.0, metadata=_help("VESPO decay for A < 0."))
    multi_objective_aggregation: str = field(default="sum_then_normalize", metadata=_help(
        "Several reward functions: 'sum_then_normalize' (weighted sum, then group advantages) or "
        "'normalize_then_sum' (GDPO: each reward normalized in its group, weighted sum, then batch-normalized)."))
    top_entropy_quantile: float = field(default=1.0, metadata=_help(
        "Train only on the loss tokens in the top share of entropy (0.2: the 20% highest-entropy tokens); 1: all."))
    entropy_coef: float = field(default=0.0, metadata=_help(
        "Entropy bonus: loss -= entropy_coef * mean token entropy (aggregated like the loss). 0: off."))
    use_adaptive_entropy: bool = field(default=False, metadata=_help(
        "Skywork-OR1 adaptive entropy control: after each optimizer step entropy_coef grows by entropy_coef_delta "
        "when the entropy is <= entropy_target and shrinks otherwise; the bonus applies only at or below target."))
    entropy_coef_min: float = field(default=0.0, metadata=_help("Lower bound of the adaptive entropy coefficient."))
    entropy_coef_max: float = field(default=1.0, metadata=_help("Upper bound of the adaptive entropy coefficient."))
    entropy_coef_delta: float = field(default=0.005, metadata=_help("Step of the adaptive entropy coefficient."))
    entropy_target: float = field(default=0.2, metadata=_help("Target mean token entropy (nats) of adaptive control."))
    off_policy_mask_threshold: float | None = field(default=None, metadata=_help(
        "DeepSeek-V3.2 off-policy sequence masking: drop negative-advantage completions whose mean KL from the "
        "sampler exceeds this (e.g. 0.5). None: off."))
    use_bias_correction_kl: bool = field(default=True, metadata=_help(
        "Multiply the KL term (beta != 0) by the importance ratio: the unbiased reverse-KL gradient (DeepSeek-V3.2)."))
    vllm_importance_sampling_correction: bool | None = field(default=None, metadata=_help(
        "TRL's name for importance_sampling_correction (True/False; None: posttrain's automatic choice)."))
    vllm_importance_sampling_mode: str | None = field(default=None, metadata=_help(
        f"TRL's sampler correction mode: {', '.join(VLLM_IS_MODES)}. None: importance_sampling_mode per token."))
    vllm_importance_sampling_clip_max: float | None = field(default=None, metadata=_help(
        "Upper bound of the sampler weights (TRL's name; sets importance_sampling_cap / _high)."))
    vllm_importance_sampling_clip_min: float | None = field(default=None, metadata=_help(
        "Lower bound of the weights kept in a *_mask mode (TRL's name; sets importance_sampling_low)."))
    vllm_importance_sampling_cap: float | None = field(default=None, metadata=_help(
        "Deprecated TRL alias of vllm_importance_sampling_clip_max."))
    cast_lm_head_to_fp32: bool = field(default=False, metadata=_help(
        "Keep the output head in float32 (log-probs of a bf16 model computed with a float32 head). Needs untied "
        "embeddings."))
    log_completions_hub_repo: str | None = field(default=None, metadata=_help(
        "Hub dataset to push completions to (TRL). Not supported: completions go through report_to (warned)."))

    def _resolve_grpo_trl_fields(self) -> None:
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(f"importance_sampling_level={self.importance_sampling_level!r}: expected 'token' or "
                             "'sequence'")
        if self.multi_objective_aggregation not in ("sum_then_normalize", "normalize_then_sum"):
            raise ValueError(f"multi_objective_aggregation={self.multi_objective_aggregation!r}: expected "
                             "'sum_then_normalize' or 'normalize_then_sum'")
        if not 0.0 < self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile={self.top_entropy_quantile}: expected a value in (0, 1]")
        if not self.entropy_coef_min <= self.entropy_coef_max:
            raise ValueError("entropy_coef_min must be <= entropy_coef_max")
        if self.vllm_importance_sampling_correction is not None:
            self.importance_sampling_correction = self.vllm_importance_sampling_correction
        clip_max = self.vllm_importance_sampling_clip_max or self.vllm_importance_sampling_cap
        if clip_max is not None:
            self.importance_sampling_cap = self.importance_sampling_high = clip_max
        if self.vllm_importance_sampling_clip_min is not None:
            self.importance_sampling_low = self.vllm_importance_sampling_clip_min
        self.importance_sampling_is_level = "token"
        if self.vllm_importance_sampling_mode is not None:
            if self.vllm_importance_sampling_mode not in VLLM_IS_MODES:
                raise ValueError(f"vllm_importance_sampling_mode={self.vllm_importance_sampling_mode!r}: expected "
                                 f"one of {VLLM_IS_MODES}")
            level, mode = self.vllm_importance_sampling_mode.split("_")
            self.importance_sampling_mode, self.importance_sampling_is_level = mode, level
