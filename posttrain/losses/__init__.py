"""Pure loss functions: per-token log-probs and masks in, (loss, metrics) out. One module per family."""
from posttrain.losses.sft import sft_loss, token_accuracy
from posttrain.losses.reward import bradley_terry_loss, pairwise_metrics  # noqa: F401
from posttrain.losses.prm import aggregate_step_scores, last_step_mask, prm_loss, step_logits, step_metrics  # noqa: F401
from posttrain.losses.dpo import DPO_LOSS_TYPES, chosen_nll, dpo_loss, dpo_single_loss, ld_pair_logps, length_desensitized_logps, reward_metrics  # noqa: F401
from posttrain.losses.cpo import CPO_LOSS_TYPES, cpo_loss  # noqa: F401
from posttrain.losses.orpo import log1mexp, orpo_loss  # noqa: F401
from posttrain.losses.kto import KTO_LOSS_TYPES, kto_kl_estimate, kto_loss, unpaired_reward_metrics  # noqa: F401
from posttrain.losses.bco import RunningMean, bco_loss, udm_density_ratio  # noqa: F401
from posttrain.losses.policy_gradient import LOSS_TYPES, aggregate_token_loss, clipped_objective, importance_weights, k3_kl, masked_importance_weights, masked_mean, truncated_importance_weights  # noqa: F401
from posttrain.losses.grpo import grpo_loss  # noqa: F401
from posttrain.losses.rloo import rloo_loss, sequence_kl  # noqa: F401
from posttrain.losses.advantages import group_relative_advantages, normalize_advantages, rloo_advantages  # noqa: F401
from posttrain.losses.ppo import explained_variance, gae_advantages, masked_whiten, ppo_policy_loss, ppo_value_loss, reinforce_pp_advantages, token_rewards  # noqa: F401
