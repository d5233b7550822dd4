"""Rollouts on the training model itself (the default engine): our decode loop, or Hugging Face ``generate``.

A plain decoder-only LM decodes in `posttrain.online.decode_loop` (decoder and head called directly, a
preallocated KV cache for Llama-family decoders; figures there); other
models (head transforms, an adapter on the head, recurrent caches) go through ``generate``. Both draw
with the same `SamplingProcessor` and give the same tokens and log-probs.

Batched with left padding and the KV cache, in chunks of at most ``max_batch_size`` sequences (sorted by
prompt length so a chunk pads little), under ``torch.inference_mode`` with the model in eval mode (its
train/eval mode is restored afterwards). DDP / DeepSpeed / ``torch.compile`` wrappers are stripped;
a PEFT model is kept, so its adapters apply.

Sampling is done by our own logits processor, which applies repetition penalty, temperature, min-p,
top-k and top-p (in vLLM's order) with transformers' processors, draws each row's token from the result
by inverse-transform sampling (one uniform per row against the running sum of the probabilities) and
records that token's log-prob under it. So the reported log-probs are those of the distribution actually
sampled from (see ``posttrain.online.engines``), and no ``[steps, batch, vocab]`` tensor is kept as
``output_scores`` would. ``generate`` runs greedy on the one-hot score row the processor returns, so it
takes exactly the drawn token: on a CPU ``torch.multinomial`` over a large vocabulary costs more than the
model's forward, a cumulative sum and a binary search a small part of it (benchmarks/README.md).
A model on posttrain's padding-free attention decodes on SDPA (about 2x faster there) and gets it back after.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from ..ops.attention import standard_attention
from ..ops.wrappers import unwrap_model
from .decode_loop import decode, supports_decode_loop
from .engines import Rollout, RolloutEngine, SamplingParams, default_stop_token_ids, encode_prompts

__all__ = ["HFEngine", "SamplingProcessor", "sample_inverse_cdf"]


SAMPLE_BLOCK = 128  # tokens per block of the two-level draw in `sample_inverse_cdf`


def sample_inverse_cdf(weights: Tensor, block: int = SAMPLE_BLOCK) -> tuple[Tensor, Tensor]:
    """One token per row of ``[B, V]`` non-negative ``weights`` (unnormalized probabilities), drawn by inverse
    transform: the first index whose running sum exceeds ``u * total``, ``u ~ U[0, 1)``. The strict comparison
    never lands on a zero-weight token (masked by top-k/top-p/min-p). Returns ``(tokens [B], totals [B])``.

    Two levels, because a running sum over the whole vocabulary is a slow sequential pass on CPU (more than the
    rest of the draw): first a block of ``block`` tokens in proportion
    to its sum, then a token inside it in proportion to its weight, with a second uniform. ``P(token) =
    P(block) P(token | block)``, the same distribution as one flat draw."""
    rows, vocab = weights.shape
    if vocab <= 2 * block:
        return _draw_flat(weights)
    if vocab % block:
        weights = torch.nn.functional.pad(weights, (0, block - vocab % block))
    blocks = weights.view(rows, -1, block)
    chosen_block, total = _draw_flat(blocks.sum(dim=-1))
    inner = blocks[torch.arange(rows, device=weights.device), chosen_block]
    offset, _ = _draw_flat(inner)
    return chosen_block * block + offset, total


def _draw_flat(weights: Tensor) -> tuple[Tensor, Tensor]:
    cdf = weights.cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, dtype=cdf.dtype, device=cdf.device) * total
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1), total.squeeze(-1)


class SamplingProcessor(LogitsProcessor):
    """Applies the sampling transforms, draws each row's token and records its log-prob under the result.

    Called by ``generate`` once per step with the raw next-token logits. It returns a one-hot score row on the
    token it chose (argmax of the transformed scores when greedy), so ``generate``, run greedy, takes exactly
    that token; ``log p = s_tok - max(s) - log(sum(exp(s - max(s))))`` needs no full log-softmax.
    """

    def __init__(self, params: SamplingParams, prompt_length: int) -> None:
        self.sample = not params.greedy
        steps: list[LogitsProcessor] = []
        if params.repetition_penalty != 1.0:
            steps.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if not params.greedy:
            if params.temperature != 1.0:
                steps.append(TemperatureLogitsWarper(params.temperature))
            if params.min_p > 0:
                steps.append(MinPLogitsWarper(params.min_p))
            if params.top_k > 0:
                steps.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                steps.append(TopPLogitsWarper(params.top_p))
        self.steps = LogitsProcessorList(steps)
        self.prompt_length = prompt_length
        self._logps: list[Tensor] = []
        self._weights: Tensor | None = None

    def draw(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        """Transform ``scores [B, V]`` (in place where possible), pick each row's token ``[B]``, record its
        log-prob. ``input_ids`` are the rows so far (the repetition penalty reads them)."""
        scores = self.steps(input_ids, scores.float())
        peak = scores.amax(dim=-1, keepdim=True)
        shifted = scores.sub_(peak)  # in place: the scores are this step's own (fresh logits, or generate's copy)
        if self._weights is None or self._weights.shape != shifted.shape:
            self._weights = torch.empty_like(shifted)  # reused every step: no 4 MB allocation per token
        weights = torch.exp(shifted, out=self._weights)
        if self.sample:
            chosen, total = sample_inverse_cdf(weights)
        else:
            chosen, total = shifted.argmax(dim=-1), weights.sum(dim=-1)
        self._logps.append(shifted.gather(1, chosen[:, None]).squeeze(1) - total.log())
        return chosen

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()
        chosen = self.draw(input_ids, scores)
        return scores.fill_(float("-inf")).scatter_(1, chosen[:, None], 0.0)  # in place: generate's own copy

    def finish(self, sequences: Tensor) -> Tensor:
        """``[B, new_tokens]`` log-probs of the generated tokens."""
        n_new = sequences.shape[1] - self.prompt_length
        if len(self._logps) != n_new:
            raise RuntimeError(f"recorded {len(self._logps)} steps for {n_new} generated tokens; was another "
                               "logits processor or the sampler changed?")
        if not self._logps:
            return sequences.new_zeros((sequences.shape[0], 0), dtype=torch.float32)
        return torch.stack(self._logps, dim=1)


@contextlib.contextmanager
def _generation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (restored after), inference mode, SDPA attention (see `standard_attention`), and ZeRO-3
    parameters gathered when present."""
    was_training = model.training
    model.eval()
    gather: Any = contextlib.nullcontext()
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if params:  # DeepSpeed ZeRO-3: generate needs whole parameters
        import deepspeed  # type: ignore[import-not-found]
        gather = deepspeed.zero.GatheredParameters(params)
    try:
        with gather, standard_attention(model), torch.inference_mode():
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed the sampler for reproducible rollouts without disturbing the caller's RNG streams."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class HFEngine(RolloutEngine):
    """Rollouts on the training model; ``sync_weights`` is a no-op (the engine is the model).

    ``decode_loop=False`` always uses ``model.generate`` (the loop is used where `supports_decode_loop`)."""

    samples_from_policy = True

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_batch_size: int = 64,
                 stop_token_ids: Sequence[int] | None = None, decode_loop: bool = True) -> None:
        super().__init__(sync_every=1)
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}: expected >= 1")
        self.model = model
        self.decode_loop = decode_loop
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.stop_token_ids = list(stop_token_ids) if stop_token_ids is not None \
            else default_stop_token_ids(tokenizer, model)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else (self.stop_token_ids[0] if self.stop_token_ids else 0)

    def generate(self, prompts: Sequence[Any], params: SamplingParams) -> Rollout:
        prompt_ids = encode_prompts(self.tokenizer, prompts)
        rows = [i for i in range(len(prompt_ids)) for _ in range(params.n)]
        # Length-sorted chunks pad little; results go back to row order.
        order = sorted(range(len(rows)), key=lambda r: len(prompt_ids[rows[r]]))
        stops = self._stops(params)
        model = unwrap_model(self.model, strip_peft=False)
        device = next(model.parameters()).device
        completions: list[list[int]] = [[] for _ in rows]
        logprobs: list[list[float]] = [[] for _ in rows]
        with _generation_mode(model), _seeded(params.seed, device):
            for start in range(0, len(order), self.max_batch_size):
                chunk = order[start:start + self.max_batch_size]
                ids, lps = self._generate_chunk(model, [prompt_ids[rows[r]] for r in chunk], params, stops, device)
                for r, c, lp in zip(chunk, ids, lps):
                    completions[r], logprobs[r] = c, lp
        stop_set = set(stops)
        return Rollout(
            prompt_index=rows,
            prompt_ids=[prompt_ids[i] for i in rows],
            completion_ids=completions,
            texts=self.tokenizer.batch_decode(completions, skip_special_tokens=True),
            logprobs=logprobs,
            truncated=[not (c and c[-1] in stop_set) for c in completions],
        ).check()

    def _stops(self, params: SamplingParams) -> list[int]:
        if not params.stop_on_eos:
            return []
        return list(dict.fromkeys(self.stop_token_ids + list(params.stop_token_ids or [])))

    def _generate_chunk(self, model: nn.Module, prompts: list[list[int]], params: SamplingParams,
                        stops: list[int], device: torch.device) -> tuple[list[list[int]], list[list[float]]]:
        length = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for b, p in enumerate(prompts):  # left padding
            input_ids[b, length - len(p):] = torch.tensor(p, dtype=torch.long)
            attention_mask[b, length - len(p):] = 1
        processor = self._sampler(params, length, attention_mask.to(device))
        # Every sampling knob is explicit so nothing is inherited from model.generation_config (an empty
        # eos list means "no stop", where None would inherit the model's); the sampling transforms live in
        # `processor`, which also draws the token: generate runs greedy on its one-hot scores.
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens, do_sample=False, repetition_penalty=1.0,
            num_beams=1, use_cache=True, eos_token_id=stops, pad_token_id=self.pad_token_id)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        if self.decode_loop and supports_decode_loop(model):
            sequences = decode(model, input_ids, attention_mask, processor, params.max_new_tokens, stops,
                               self.pad_token_id)
        else:
            sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                       logits_processor=LogitsProcessorList([processor]))
        if not isinstance(sequences, Tensor):
            sequences = sequences.sequences
        logps = processor.finish(sequences).float().cpu()
        new = sequences[:, length:].cpu()
        stop_set = set(stops)
        out_ids: list[list[int]] = []
        out_lps: list[list[float]] = []
        for b in range(new.shape[0]):
            ids = new[b].tolist()
            end = next((t + 1 for t, tok in enumerate(ids) if tok in stop_set), len(ids))
            out_ids.append(ids[:end])
            out_lps.append(logps[b, :end].tolist())
        return out_ids, out_lps

    def _sampler(self, params: SamplingParams, prompt_length: int, attention_mask: Tensor) -> SamplingProcessor:
        """The sampler of one chunk of left-padded prompts (``attention_mask [B, prompt_length]``); a subclass
        may return one that reshapes the logits further (`posttrain.online.engine_mixture`)."""
        return SamplingProcessor(params, prompt_length)

    def load_named_weights(self, pairs: Any) -> int:
        """Copy ``(name, tensor)`` pairs into the model's parameters by name (the rollout server's HF
        backend). Unknown names are an error naming them. Returns the number of tensors copied."""
        model = unwrap_model(self.model)
        count = 0
        with torch.no_grad():
            for name, tensor in pairs:
                try:
                    param = model.get_parameter(name)
                except AttributeError:
                    raise KeyError(f"weight {name!r} is not a parameter of {type(model).__name__}") from None
                if tuple(param.shape) != tuple(tensor.shape):
                    raise ValueError(f"weight {name!r}: shape {tuple(tensor.shape)} does not match the model's "
                                     f"{tuple(param.shape)}")
                param.copy_(tensor.to(param.device, param.dtype))
                count += 1
        return count
