"""The reward-token convention: sequences end where the tokenizer's chat template ends an
assistant turn (what RewardBench, TRL and vLLM feed a reward model), every client form
is put into it, and preprocessing records it."""

from __future__ import annotations

import pytest

from megarm.data.handlers import RecordError
from megarm.data.templates import TemplateError, get_template, reward_convention

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6, of course.\n"},
    ],
]


@pytest.mark.parametrize("prompt_type", ["auto", "qwen"])
def test_rows_end_where_apply_chat_template_ends(qwen_tokenizer, prompt_type):
    template = get_template(prompt_type, qwen_tokenizer)
    for messages in CONVERSATIONS:
        text = template.prompt(messages[:-1]) + template.response(messages[-1]["content"])
        assert text == qwen_tokenizer.apply_chat_template(messages, tokenize=False)
        assert text.endswith("<|im_end|>\n")


def test_client_forms_are_normalised(qwen_tokenizer):
    template = get_template("auto", qwen_tokenizer)
    messages = CONVERSATIONS[1]
    full = qwen_tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = qwen_tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True
    )
    want = (prompt, "6, of course.\n<|im_end|>\n")
    at_end_of_turn = full[: -len("\n")]  # OpenRLHF's query: vLLM stops at <|im_end|>
    cut_off = full[: -len("<|im_end|>\n")]  # a response truncated by max_tokens
    padded = full + "<|endoftext|><|endoftext|>"
    for text in (full, at_end_of_turn, cut_off, at_end_of_turn + "\n\n"):
        assert template.split_text(text) == want
    assert template.split_text(padded, trailing=("<|endoftext|>",)) == want
    assert template.split_text(full, prompt=prompt) == want
    # The prompt, when given, decides where the response starts.
    short_prompt = prompt[: -len("<|im_start|>assistant\n")]
    assert template.split_text(full, prompt=short_prompt)[0] == short_prompt
    with pytest.raises(RecordError, match="no assistant header"):
        template.split_text("just some text")


def test_convention_is_recorded_and_can_be_overridden(qwen_tokenizer):
    auto = get_template("auto", qwen_tokenizer)
    assert reward_convention(auto, qwen_tokenizer) == {
        "sequence_end": "<|im_end|>\n",
        "end_of_turn": "<|im_end|>",
        "reward_token_id": 198,  # "\n"
        "reward_position": "last token",
    }
    legacy = get_template("auto", qwen_tokenizer, "<|im_end|>")
    assert legacy.response("4") == "4<|im_end|>"
    assert reward_convention(legacy, qwen_tokenizer)["reward_token_id"] == 151645
    with pytest.raises(TemplateError, match="does not start with"):
        get_template("auto", qwen_tokenizer, "\n")


def test_preprocessing_records_the_convention(preprocess, qwen_tokenizer):
    run = preprocess([{"prompt": "Q", "chosen": "A", "rejected": "B"}], "pairwise_messages")
    assert run.rc == 0
    assert run.stats()["template"]["reward_convention"]["sequence_end"] == "<|im_end|>\n"
    assert run.pairs()["chosen_input_ids"][0][-2:] == [151645, 198]
