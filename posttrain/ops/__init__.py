"""Memory-lean kernels in plain PyTorch: chunked selective log-softmax, per-token log-probs, divergences."""
from posttrain.ops.divergences import DIVERGENCES, chunked_divergence
from posttrain.ops.forward import TokenLogps, decoder_hidden_states, output_head, prediction_mask, shared_head, token_divergence, token_logps
from posttrain.ops.logprobs import argmax_tokens, selective_log_softmax, selective_log_softmax_ext
from posttrain.ops.wrappers import is_peft_model, unwrap_model
