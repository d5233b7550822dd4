"""Config fields every posttrain config shares with TRL's configs beyond `transformers.TrainingArguments`:
model loading (``trust_remote_code``), memory (``activation_offloading``), mixture-of-experts
(``router_aux_loss_coef``) and the tokenizer (``pad_token``, ``eos_token``, ``chat_template_path``). What
each does is in its help; the trainer applies them in `PostTrainer.__init__` (see `_compat`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TRLSharedFields", "resolve_pad_to_multiple_of", "PAD_TO_MULTIPLE_HELP"]

PAD_TO_MULTIPLE_HELP = ("Pad each batch's rows to a multiple of this many tokens. 'auto' (TRL's default): a multiple "
                        "of 128 on AWS Neuron (one compilation per shape), no rounding elsewhere. None: no rounding.")


def resolve_pad_to_multiple_of(value: int | str | None) -> int | None:
    """TRL's ``pad_to_multiple_of`` as a number or None: 'auto' is None here (posttrain never runs on Neuron),
    command-line strings ('8', 'none') are parsed."""
    if value is None or value == "auto":
        return None
    if isinstance(value, str):
        if value.lower() in ("none", "null"):
            return None
        value = int(value)
    if value < 1:
        raise ValueError(f"pad_to_multiple_of={value}: expected a positive integer, 'auto' or None")
    return value


@dataclass
class TRLSharedFields:
    trust_remote_code: bool = field(default=False, metadata={"help": (
        "Allow a model or tokenizer from the hub to run its own Python code when loaded by name.")})
    activation_offloading: bool = field(default=False, metadata={"help": (
        "Keep the activations saved for the backward pass in (pinned) host memory, saving accelerator memory at "
        "the cost of transfers. No effect on a CPU (warned).")})
    router_aux_loss_coef: float | None = field(default=None, metadata={"help": (
        "Mixture-of-experts load-balancing loss weight (TRL). posttrain computes log-probs from hidden states and "
        "does not add the router loss: accepted for compatibility, warned when set.")})
    pad_token: str | None = field(default=None, metadata={"help": (
        "Token to pad with (must be in the vocabulary). Default: the tokenizer's pad token, else its EOS.")})
    eos_token: str | None = field(default=None, metadata={"help": (
        "End-of-sequence token set on the trainer's tokenizer (must be in the vocabulary); the tokenizer's own "
        "otherwise.")})
    chat_template_path: str | None = field(default=None, metadata={"help": (
        "A Jinja chat template file, or a tokenizer folder whose chat template is used (instead of "
        "chat_template).")})
