"""Chat templates: a registry of common formats (jinja, written for posttrain) and how to install one.

Every template renders `system`, `user`, `assistant` and `tool` messages (formats without a system role fold
the system message into the first user turn), honours `add_generation_prompt`, and renders prefixes
consistently: `render(messages[:i], add_generation_prompt=True)` is a prefix of `render(messages)` when message
`i` is an assistant turn. `tokenization.tokenize_messages` relies on that to find the assistant spans.

End-of-turn markers: chatml `<|im_end|>`, llama3 `<|eot_id|>`, gemma `<end_of_turn>`, phi3 `<|end|>`; the formats
whose models end a turn with their EOS (llama2, mistral, zephyr, alpaca, vicuna, plain) use the tokenizer's
`eos_token` (falling back to `</s>`), and `bos_token` where the format starts with one (nothing when the
tokenizer has none). Marker strings the tokenizer lacks as special tokens are tokenized as ordinary text.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from .formats import parse_tools

logger = logging.getLogger(__name__)

_BOS = "{%- set bos = bos_token if (bos_token is defined and bos_token) else '' -%}"
_EOS = "{%- set eos = eos_token if (eos_token is defined and eos_token) else '</s>' -%}"
# Split off a leading system message: `sys` (or none) and the remaining `msgs`.
_SPLIT_SYSTEM = (
    "{%- if messages and messages[0].role == 'system' -%}"
    "{%- set sys = messages[0].content -%}{%- set msgs = messages[1:] -%}"
    "{%- else -%}{%- set sys = none -%}{%- set msgs = messages -%}{%- endif -%}"
)

_CHATML = (
    "{%- set ns = namespace(skip_system=false) -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages and messages[0].role == 'system' -%}"
    "{{- messages[0].content + '\\n\\n' -}}{%- set ns.skip_system = true -%}{%- endif -%}"
    "{{- '# Tools\\n\\nYou may call one or more of these functions:\\n<tools>\\n' -}}"
    "{%- for tool in tools -%}{{- tool | tojson -}}{{- '\\n' -}}{%- endfor -%}"
    "{{- '</tools><|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (loop.first and ns.skip_system) -%}"
    "{{- '<|im_start|>' + message.role + '\\n' -}}"
    "{%- if message.content -%}{{- message.content -}}{%- endif -%}"
    "{%- if message.tool_calls -%}{%- for call in message.tool_calls -%}"
    "{{- '<tool_call>\\n' -}}{{- call | tojson -}}{{- '\\n</tool_call>' -}}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_LLAMA2 = (
    _BOS + _EOS + _SPLIT_SYSTEM + "{%- for message in msgs -%}"
    "{%- if message.role == 'assistant' -%}{{- ' ' + message.content + ' ' + eos -}}"
    "{%- else -%}{{- bos + '[INST] ' -}}"
    "{%- if loop.first and sys is not none -%}{{- '<<SYS>>\\n' + sys + '\\n<</SYS>>\\n\\n' -}}{%- endif -%}"
    "{{- message.content + ' [/INST]' -}}{%- endif -%}"
    "{%- endfor -%}"
)

_MISTRAL = (
    _BOS + _EOS + _SPLIT_SYSTEM + "{{- bos -}}{%- for message in msgs -%}"
    "{%- if message.role == 'assistant' -%}{{- message.content + eos -}}"
    "{%- else -%}{{- '[INST] ' -}}"
    "{%- if loop.first and sys is not none -%}{{- sys + '\\n\\n' -}}{%- endif -%}"
    "{{- message.content + ' [/INST]' -}}{%- endif -%}"
    "{%- endfor -%}"
)

_LLAMA3 = (
    _BOS + "{{- bos -}}{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

_ZEPHYR = (
    _EOS + "{%- for message in messages -%}"
    "{{- '<|' + message.role + '|>\\n' + message.content + eos + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

_ALPACA = (
    _EOS + _SPLIT_SYSTEM
    + "{%- if sys is none -%}{%- set sys = 'Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.' -%}{%- endif -%}"
    "{{- sys + '\\n\\n' -}}"
    "{%- for message in msgs -%}"
    "{%- if message.role == 'assistant' -%}{{- '### Response:\\n' + message.content + eos + '\\n\\n' -}}"
    "{%- else -%}{{- '### Instruction:\\n' + message.content + '\\n\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}"
)

_VICUNA = (
    _EOS + _SPLIT_SYSTEM
    + "{%- if sys is none -%}{%- set sys = 'A chat between a curious user and an artificial intelligence "
    "assistant. The assistant gives helpful, detailed, and polite answers to the user\\'s questions.' -%}"
    "{%- endif -%}"
    "{{- sys + ' ' -}}"
    "{%- for message in msgs -%}"
    "{%- if message.role == 'assistant' -%}{{- 'ASSISTANT: ' + message.content + eos -}}"
    "{%- else -%}{{- 'USER: ' + message.content + ' ' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

_GEMMA = (
    _BOS + _SPLIT_SYSTEM + "{{- bos -}}{%- for message in msgs -%}"
    "{%- set role = 'model' if message.role == 'assistant' else message.role -%}"
    "{{- '<start_of_turn>' + role + '\\n' -}}"
    "{%- if loop.first and sys is not none -%}{{- sys + '\\n\\n' -}}{%- endif -%}"
    "{{- message.content + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

_PHI3 = (
    "{%- for message in messages -%}"
    "{{- '<|' + message.role + '|>\\n' + message.content + '<|end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

_PLAIN = (
    _EOS + "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}{{- message.content + eos -}}"
    "{%- else -%}{{- message.content + '\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
)

CHAT_TEMPLATES: dict[str, str] = {
    "chatml": _CHATML,
    "llama2": _LLAMA2,
    "llama3": _LLAMA3,
    "mistral": _MISTRAL,
    "zephyr": _ZEPHYR,
    "alpaca": _ALPACA,
    "vicuna": _VICUNA,
    "gemma": _GEMMA,
    "phi3": _PHI3,
    "plain": _PLAIN,
}

DEFAULT_CHAT_TEMPLATE = "chatml"


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase, name: str | None = None) -> PreTrainedTokenizerBase:
    """Give `tokenizer` a chat template and return it (modified in place; trainers use `trainer_tokenizer`,
    which leaves the caller's object alone).

    `name=None` keeps the tokenizer's own template, or installs chatml when it has none. A registry name
    (`CHAT_TEMPLATES`) or a raw jinja string (anything containing `{%`) replaces the current template.
    """
    if name is None:
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = CHAT_TEMPLATES[DEFAULT_CHAT_TEMPLATE]
        return tokenizer
    tokenizer.chat_template = _template_for(name)
    return tokenizer


def _template_for(name: str) -> str:
    if "{%" in name or "{{" in name:
        return name
    if name in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name]
    raise ValueError(
        f"unknown chat template '{name}'; expected one of {sorted(CHAT_TEMPLATES)} or a jinja template string"
    )


def trainer_tokenizer(processing_class: Any, chat_template: str | None = None) -> tuple[Any, PreTrainedTokenizerBase]:
    """The processing class a trainer uses and its tokenizer: with a pad token (EOS when it has none) and the
    chat template `chat_template` (see `ensure_chat_template`).

    Where anything must change, the change is made on a copy: the caller's tokenizer object is never modified
    (TRL's trainers do not modify it either). A tokenizer without a chat template gets posttrain's chatml one
    when `chat_template` is None, with a warning: TRL 1.16 raises instead, at the first conversation it renders.
    """
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    current = getattr(tokenizer, "chat_template", None)
    template = _template_for(chat_template) if chat_template is not None else current or CHAT_TEMPLATES[
        DEFAULT_CHAT_TEMPLATE]
    if tokenizer.pad_token is not None and template == current:
        return processing_class, tokenizer
    if not current and chat_template is None:
        logger.warning(
            "the tokenizer has no chat template: this run renders conversations with posttrain's '%s' template "
            "(TRL raises instead); set chat_template to choose one. The caller's tokenizer is left unchanged.",
            DEFAULT_CHAT_TEMPLATE,
        )
    processing_class = copy.deepcopy(processing_class)
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = template
    return processing_class, tokenizer


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = False,
    tools: list[dict] | str | None = None,
) -> str:
    """Render a conversation (possibly empty) to text with the tokenizer's chat template.

    Same result as `tokenizer.apply_chat_template(..., tokenize=False)`, but accepts an empty conversation (the
    generation prompt of a conversation that opens with an assistant turn), and `tools` as a JSON string too
    (how hub datasets store them; see `formats.parse_tools`).
    """
    tools = parse_tools(tools)
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("the tokenizer has no chat template; call posttrain.data.ensure_chat_template(tokenizer)")
    template = tokenizer.get_chat_template(None, tools)
    rendered, _ = render_jinja_template(
        conversations=[messages],
        tools=tools,
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        **tokenizer.special_tokens_map,
    )
    return rendered[0]


def end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str:
    """The string the tokenizer's chat template puts after an assistant message (e.g. `<|im_end|>`), found by
    rendering a probe conversation. Generation should stop on it: it is often not the tokenizer's EOS."""
    probe = "\x00posttrain-probe\x00"
    text = render_chat(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}])
    if probe not in text:
        raise ValueError("the chat template does not render the assistant message's content")
    return text[text.rindex(probe) + len(probe):].strip()
