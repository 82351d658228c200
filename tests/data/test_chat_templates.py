"""Named templates write the documented text; auto reads the tokenizer's own."""

from __future__ import annotations

import pytest

from megarm.data.templates import TemplateError, get_template

CONVERSATION = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
]


def test_chatml_and_qwen(qwen_tokenizer, qwen_system):
    turns = (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    chatml = get_template("chatml", qwen_tokenizer)
    assert chatml.prompt(CONVERSATION) == turns
    assert chatml.response("4") == "4<|im_end|>\n"  # as the chat template ends a turn
    qwen = get_template("qwen", qwen_tokenizer)
    assert qwen.prompt(CONVERSATION) == qwen_system + turns
    with_system = [{"role": "system", "content": "Terse."}, *CONVERSATION]
    assert qwen.prompt(with_system) == "<|im_start|>system\nTerse.<|im_end|>\n" + turns


def test_auto_equals_qwen_on_qwen_tokenizer(qwen_tokenizer):
    auto, qwen = get_template("auto", qwen_tokenizer), get_template("qwen", qwen_tokenizer)
    assert (auto.header, auto.end_of_turn) == ("<|im_start|>assistant\n", "<|im_end|>")
    assert auto.response_end == qwen.response_end == "<|im_end|>\n"
    for messages in (CONVERSATION, [{"role": "system", "content": "S"}, *CONVERSATION]):
        assert auto.prompt(messages) == qwen.prompt(messages)


def test_plain(qwen_tokenizer):
    plain = get_template("plain", qwen_tokenizer)
    assert (
        plain.prompt(CONVERSATION) == "User: Hi\n\nAssistant: Hello!\n\nUser: 2+2?\n\nAssistant: "
    )
    assert plain.response("4") == "4<|im_end|>"  # Qwen2.5-Instruct's eos


def test_llama3_text_and_tokenizer_mismatch(qwen_tokenizer):
    from megarm.data.templates import Llama3Template

    assert Llama3Template().prompt([{"role": "user", "content": " Hi "}]) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    # <|eot_id|> is not one Qwen token, so the reward position would be ambiguous.
    with pytest.raises(TemplateError, match="end-of-turn text '<\\|eot_id\\|>' is .* tokens"):
        get_template("llama3", qwen_tokenizer)
