"""Classification heads for the reward trainers: finding, converting, initializing and saving them.

Shared by `RewardTrainer` (a one-score sequence-classification head) and `PRMTrainer` (a 2-label
token-classification head). Backbones name their head differently (Llama/Qwen/Mistral: `score`,
BERT/RoBERTa: `classifier`), so everything here looks the head up by name rather than assuming one.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..models import unwrap_model
from ..models.loading import TASKS

__all__ = [
    "HEAD_NAMES",
    "head_name",
    "as_classifier",
    "init_head",
    "disable_dropout",
    "peft_config_with_head",
    "prepare_head",
]

HEAD_NAMES = ("score", "classifier", "classification_head")


def head_name(model: nn.Module) -> str:
    """The attribute name of the model's classification head (`score`, `classifier`, ...)."""
    base = unwrap_model(model)
    for name in HEAD_NAMES:
        if isinstance(getattr(base, name, None), nn.Module):
            return name
    raise ValueError(
        f"{type(base).__name__} has no classification head named one of {HEAD_NAMES}; load the model with a "
        "sequence/token classification head (posttrain.models.load_model(name, task='seq-cls'))"
    )


def as_classifier(model: nn.Module, task: str, num_labels: int) -> nn.Module:
    """Return `model` with a `task` head ("seq-cls" or "token-cls") of `num_labels` outputs.

    A classification model with the right number of labels is returned as is; a causal LM object (e.g.
    from `build_tiny`) is rebuilt with a fresh classification head on the same backbone weights, so any
    causal LM can become a reward model; anything else is a clear error.
    """
    base = unwrap_model(model, strip_peft=False)
    kind = "ForSequenceClassification" if task == "seq-cls" else "ForTokenClassification"
    name = type(base).__name__
    if name.endswith(kind):
        got = getattr(base.config, "num_labels", None)
        if got != num_labels:
            raise ValueError(f"{name} has num_labels={got}; this trainer needs num_labels={num_labels}")
        return model
    if name.endswith("ForCausalLM"):
        config = copy.deepcopy(base.config)
        config.num_labels = num_labels
        new = TASKS[task].from_config(config, dtype=next(base.parameters()).dtype)
        prefix = new.base_model_prefix
        getattr(new, prefix).load_state_dict(getattr(base, base.base_model_prefix).state_dict())
        new.config._name_or_path = base.config._name_or_path
        return new
    raise ValueError(f"expected a {kind} model or a causal LM to put a head on, got {name}")


def _head_linear(head: nn.Module) -> nn.Linear:
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"classification head {type(head).__name__} has no linear layer")
    return linears[-1]  # e.g. RoBERTa's dense -> out_proj: the output projection is last


def init_head(model: nn.Module, force: bool | None = None) -> bool:
    """Initialize the head's output layer with N(0, 1/(hidden + 1)) weights and a zero bias.

    A small init keeps the initial scores near zero, so the first Bradley-Terry / cross-entropy gradients
    reach the backbone undistorted. `force=None` initializes only a head the checkpoint did not provide
    (transformers marks every loaded parameter `_is_hf_initialized`); True always, False never.
    Returns whether it initialized. The head is marked afterwards so a second trainer on the same
    model object keeps it.
    """
    if force is False:
        return False
    layer = _head_linear(getattr(unwrap_model(model), head_name(model)))
    params = list(layer.parameters())
    if force is None and params and all(getattr(p, "_is_hf_initialized", False) for p in params):
        return False
    with torch.no_grad():
        layer.weight.normal_(mean=0.0, std=1.0 / math.sqrt(layer.in_features + 1))
        if layer.bias is not None:
            layer.bias.zero_()
    for p in params:
        p._is_hf_initialized = True
    return True


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0: dropout makes the two scores of a pair noisy for no benefit."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def peft_config_with_head(peft_config: Any, head: str, task_type: str) -> Any:
    """A copy of `peft_config` (dict or `peft.PeftConfig`) that also trains and saves the head `head`."""
    if peft_config is None:
        return None
    if isinstance(peft_config, Mapping):
        out = dict(peft_config)
        saved = list(out.get("modules_to_save") or [])
        out["modules_to_save"] = saved + ([head] if head not in saved else [])
        out.setdefault("task_type", task_type)
        return out
    out = copy.copy(peft_config)
    saved = list(getattr(out, "modules_to_save", None) or [])
    if head not in saved:
        out.modules_to_save = saved + [head]
    if getattr(out, "task_type", None) is None:
        out.task_type = task_type
    return out


def prepare_head(model: nn.Module, args: Any, peft_config: Any, peft_task_type: str) -> Any:
    """What both reward trainers do to a freshly resolved classification model before PEFT wraps it:
    a seeded head init (`args.init_score_head`, `args.seed`; the global RNG is left alone), dropout off
    (`args.disable_dropout`), and a PEFT config that also trains and saves the head. Returns that config."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        init_head(model, force=args.init_score_head)
    if args.disable_dropout:
        disable_dropout(model)
    return peft_config_with_head(peft_config, head_name(model), peft_task_type)
