"""Chat templates and tokenization: exact assistant masks for every template, prompt/completion splits,
truncation flags, and the errors users see."""

import pytest
from tokenizers import processors

from posttrain.data import (
    CHAT_TEMPLATES,
    end_of_turn,
    ensure_chat_template,
    render_chat,
    tokenize_messages,
    tokenize_prompt_completion,
    tokenize_text,
)
from posttrain.models import CHATML_TEMPLATE, build_tokenizer

# The format markers become special tokens in the test tokenizer, so a masked run decodes to exactly the
# expected text (the templates work without them too; they are then tokenized as plain text).
MARKERS = [
    "[INST]", "[/INST]", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<start_of_turn>",
    "<end_of_turn>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>",
]
EOS = "<|endoftext|>"
# What each template masks for an assistant message with content {c}: the content and its end-of-turn
# marker, plus the separating space the format puts before the content (BPE glues it to the first word).
ASSISTANT_TURN = {
    "chatml": "{c}<|im_end|>",
    "llama2": " {c} " + EOS,
    "llama3": "{c}<|eot_id|>",
    "mistral": "{c}" + EOS,
    "zephyr": "{c}" + EOS,
    "alpaca": "{c}" + EOS,
    "vicuna": " {c}" + EOS,
    "gemma": "{c}<end_of_turn>",
    "phi3": "{c}<|end|>",
    "plain": "{c}" + EOS,
}
NO_GENERATION_PROMPT = {"llama2", "mistral", "plain"}  # the prompt already ends where the answer starts

CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3, twice?"},
    {"role": "assistant", "content": "Six; (then) 12!"},
    {"role": "user", "content": "Thanks."},
    {"role": "assistant", "content": "You're welcome.\nBye."},
]


@pytest.fixture(scope="module")
def tok():
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(MARKERS, special_tokens=True)
    return tokenizer


def masked_runs(tokenizer, ids, mask):
    runs, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


def test_registry_has_the_formats():
    assert set(ASSISTANT_TURN) <= set(CHAT_TEMPLATES)


@pytest.mark.parametrize("name", sorted(ASSISTANT_TURN))
def test_masks_cover_exactly_assistant_turns(tok, name):
    ensure_chat_template(tok, name)
    out = tokenize_messages(tok, CONV)
    assert len(out["input_ids"]) == len(out["assistant_mask"]) and out["truncated"] is False
    text = render_chat(tok, CONV)
    assert tok.decode(out["input_ids"]) == text
    assert "You are terse." in text  # the system message is rendered in every format
    expected = [ASSISTANT_TURN[name].format(c=m["content"]) for m in CONV if m["role"] == "assistant"]
    assert masked_runs(tok, out["input_ids"], out["assistant_mask"]) == expected


@pytest.mark.parametrize("name", sorted(ASSISTANT_TURN))
def test_end_of_turn(tok, name):
    ensure_chat_template(tok, name)
    assert end_of_turn(tok) == ASSISTANT_TURN[name].format(c="").strip()


@pytest.mark.parametrize("name", sorted(ASSISTANT_TURN))
def test_generation_prompt(tok, name):
    ensure_chat_template(tok, name)
    prompt = render_chat(tok, CONV[:2], add_generation_prompt=True)
    assert render_chat(tok, CONV[:3]).startswith(prompt)
    if name not in NO_GENERATION_PROMPT:
        assert len(prompt) > len(render_chat(tok, CONV[:2]))


@pytest.mark.parametrize("name", sorted(ASSISTANT_TURN))
def test_masks_without_system_and_starting_with_assistant(tok, name):
    ensure_chat_template(tok, name)
    conv = [{"role": "assistant", "content": "Hi there."}, {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "How can I help?"}]
    out = tokenize_messages(tok, conv)
    expected = [ASSISTANT_TURN[name].format(c=m["content"]) for m in conv if m["role"] == "assistant"]
    assert masked_runs(tok, out["input_ids"], out["assistant_mask"]) == expected


def test_masks_match_transformers_generation_markers():
    """The project tokenizer's own ChatML template has {% generation %} markers: an independent mask."""
    tokenizer = build_tokenizer()
    assert tokenizer.chat_template == CHATML_TEMPLATE
    ensure_chat_template(tokenizer)  # keeps the tokenizer's own template
    assert tokenizer.chat_template == CHATML_TEMPLATE
    reference = tokenizer.apply_chat_template(CONV, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    out = tokenize_messages(tokenizer, CONV)
    assert out["input_ids"] == reference["input_ids"]
    assert out["assistant_mask"] == reference["assistant_masks"]


def test_markers_that_are_not_special_tokens_are_still_masked():
    tokenizer = ensure_chat_template(build_tokenizer(), "llama3")  # <|eot_id|> etc. split into pieces
    out = tokenize_messages(tokenizer, CONV)
    runs = masked_runs(tokenizer, out["input_ids"], out["assistant_mask"])
    assert runs == [m["content"] + "<|eot_id|>" for m in CONV if m["role"] == "assistant"]


@pytest.mark.parametrize("name", ["chatml", "llama2", "vicuna"])
def test_masks_with_trimmed_offsets(name):
    """A ByteLevel post-processor with trim_offsets=True gives whitespace-only tokens zero-width offsets."""
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(MARKERS, special_tokens=True)
    tokenizer.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    ensure_chat_template(tokenizer, name)
    out = tokenize_messages(tokenizer, CONV)
    expected = [ASSISTANT_TURN[name].format(c=m["content"]) for m in CONV if m["role"] == "assistant"]
    assert masked_runs(tokenizer, out["input_ids"], out["assistant_mask"]) == expected


def test_tools_and_tool_calls_in_chatml(tok):
    ensure_chat_template(tok, "chatml")
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
    conv = [CONV[0], CONV[1], {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "4"}, {"role": "assistant", "content": "It is 4."}]
    out = tokenize_messages(tok, conv, tools=tools)
    text = render_chat(tok, conv, tools=tools)
    assert '"name": "add"' in text.split("<|im_end|>")[0]  # the tools sit in the system turn
    runs = masked_runs(tok, out["input_ids"], out["assistant_mask"])
    assert len(runs) == 2 and runs[0].startswith("<tool_call>") and runs[0].endswith("</tool_call><|im_end|>")
    assert runs[1] == "It is 4.<|im_end|>"


def test_prefix_inconsistent_template_raises(tok):
    # Renders only the last assistant turn's content: earlier turns change once more messages follow.
    template = (
        "{%- for m in messages -%}{%- if m.role == 'assistant' and not loop.last -%}[old]"
        "{%- else -%}{{- m.role + ': ' + m.content + '\\n' -}}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}assistant: {%- endif -%}"
    )
    ensure_chat_template(tok, template)
    assert tok.chat_template == template
    with pytest.raises(ValueError, match="prefix-consistently at message 2"):
        tokenize_messages(tok, CONV)


def test_ensure_chat_template_choices():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    assert ensure_chat_template(tokenizer).chat_template == CHAT_TEMPLATES["chatml"]
    ensure_chat_template(tokenizer, "gemma")
    assert tokenizer.chat_template == CHAT_TEMPLATES["gemma"]
    with pytest.raises(ValueError, match=r"unknown chat template 'llama9'.*'alpaca', 'chatml'"):
        ensure_chat_template(tokenizer, "llama9")
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        render_chat(tokenizer, CONV)


def test_prompt_completion_plain(tok):
    out = tokenize_prompt_completion(tok, "Q: 2+2? A:", " 4")
    assert tok.decode(out["prompt_ids"]) == "Q: 2+2? A:"
    assert tok.decode(out["completion_ids"]) == " 4" + EOS
    assert out["completion_ids"][-1] == tok.eos_token_id and out["truncated"] is False


@pytest.mark.parametrize("name", ["chatml", "llama2", "gemma"])
def test_prompt_completion_conversational(tok, name):
    ensure_chat_template(tok, name)
    prompt, completion = CONV[:4], CONV[4:5]
    out = tokenize_prompt_completion(tok, prompt, completion)
    assert tok.decode(out["prompt_ids"]) == render_chat(tok, prompt, add_generation_prompt=True)
    assert tok.decode(out["completion_ids"]) == ASSISTANT_TURN[name].format(c=CONV[4]["content"])
    with pytest.raises(ValueError, match="both be strings or both be lists"):
        tokenize_prompt_completion(tok, prompt, "text")


def test_text_and_truncation_flags(tok):
    out = tokenize_text(tok, "hello world")
    assert out["input_ids"][-1] == tok.eos_token_id and tok.decode(out["input_ids"]) == "hello world" + EOS
    short = tokenize_text(tok, "hello world, hello again", max_length=3)
    assert len(short["input_ids"]) == 3 and short["truncated"] is True
    assert tokenize_text(tok, "hi", max_length=100)["truncated"] is False

    ensure_chat_template(tok, "chatml")
    full = tokenize_messages(tok, CONV)
    cut = tokenize_messages(tok, CONV, max_length=20)
    assert cut["truncated"] is True and cut["input_ids"] == full["input_ids"][:20]
    assert cut["assistant_mask"] == full["assistant_mask"][:20]

    pc = tokenize_prompt_completion(tok, "one two three four", " five six seven", max_length=6)
    full_pc = tokenize_prompt_completion(tok, "one two three four", " five six seven")
    assert pc["truncated"] is True and len(pc["prompt_ids"]) + len(pc["completion_ids"]) == 6
    assert pc["prompt_ids"] == full_pc["prompt_ids"]  # the completion is cut first
    assert pc["completion_ids"] == full_pc["completion_ids"][: 6 - len(full_pc["prompt_ids"])]
