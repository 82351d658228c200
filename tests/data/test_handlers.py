"""Each handler turns its raw format into the expected prompt/chosen/rejected/margin."""

from __future__ import annotations

import pytest

from megarm.data.handlers import HANDLERS, Pair, RecordError, get_handler


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def reason_of(handler, record) -> str:
    with pytest.raises(RecordError) as info:
        handler(record)
    return info.value.reason


def test_registry():
    assert sorted(HANDLERS) == [
        "alpaca_pairwise",
        "critique_pairs",
        "helpsteer2",
        "helpsteer2_preference",
        "hh_rlhf",
        "math_shepherd",
        "pairwise_messages",
        "prm_steps",
        "ranked",
        "regression",
        "sft",
        "stack_exchange_paired",
        "ultrafeedback_ranked",
    ]
    assert get_handler("AlpacaStylePairwiseHandler").name == "alpaca_pairwise"
    with pytest.raises(ValueError, match="unknown --handler-name 'nope'"):
        get_handler("nope")


def test_pairwise_strings_with_prompt_and_system():
    handler = get_handler("pairwise_messages")
    pair = handler({"prompt": "Q?", "chosen": "A", "rejected": "B", "system": "Be nice."})
    assert pair == Pair([system("Be nice."), user("Q?")], "A", "B", None)


def test_pairwise_orca_map_keys():
    handler = get_handler(
        "pairwise_messages",
        {"prompt": "question", "chosen": "chosen", "rejected": "rejected", "system": "system"},
    )
    pair = handler({"system": "", "question": "2+2?", "chosen": "4", "rejected": "5"})
    assert pair == Pair([user("2+2?")], "4", "5", None)  # empty system is dropped


def test_pairwise_message_lists_share_prefix_and_score_margin():
    handler = get_handler("pairwise_messages", {"margin": ["score_chosen", "score_rejected"]})
    conversation = [user("Hi"), assistant("Hello"), user("Joke?")]
    record = {
        "prompt": "Joke?",  # UltraFeedback repeats it; the full conversation wins
        "chosen": [*conversation, assistant("Knock knock")],
        "rejected": [*conversation, assistant("No")],
        "score_chosen": 8.5,
        "score_rejected": 6.0,
    }
    assert handler(record) == Pair(conversation, "Knock knock", "No", 2.5)
    assert handler.has_margin


def test_pairwise_trl_explicit_prompt_and_sharegpt_keys():
    handler = get_handler("pairwise_messages", margin="m")
    record = {
        "prompt": [{"from": "human", "value": "Hi"}],
        "chosen": [{"from": "gpt", "value": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
        "m": "1.5",
    }
    assert handler(record) == Pair([user("Hi")], "Hello!", "Go away.", 1.5)


def test_pairwise_rejects():
    handler = get_handler("pairwise_messages")
    assert reason_of(handler, {"prompt": "Q", "chosen": "A"}) == "missing_key"
    assert reason_of(handler, {"chosen": "A", "rejected": "B"}) == "missing_key"
    assert reason_of(handler, {"prompt": "Q", "chosen": " ", "rejected": "B"}) == "empty_response"
    assert reason_of(handler, {"prompt": "Q", "chosen": "A ", "rejected": "A"}) == "identical"
    differing = {
        "chosen": [user("Hi"), assistant("A")],
        "rejected": [user("Hello"), assistant("B")],
    }
    assert reason_of(handler, differing) == "malformed_record"
    assert reason_of(handler, {"prompt": "Q", "chosen": 3, "rejected": "B"}) == "malformed_record"
    scored = get_handler("pairwise_messages", margin=["a", "b"])
    assert (
        reason_of(scored, {"prompt": "Q", "chosen": "A", "rejected": "B", "a": 1}) == "missing_key"
    )
    with pytest.raises(ValueError, match="does not read; valid keys"):
        get_handler("pairwise_messages", {"question": "q"})


def test_alpaca_pairwise_with_history_and_system():
    handler = get_handler("alpaca_pairwise")
    record = {
        "instruction": "Translate",
        "input": "bonjour",
        "output": ["hello", "goodbye"],
        "system": "You translate.",
        "history": [["Hi", "Hello! What can I do?"]],
    }
    assert handler(record) == Pair(
        [
            system("You translate."),
            user("Hi"),
            assistant("Hello! What can I do?"),
            user("Translate\nbonjour"),
        ],
        "hello",
        "goodbye",
    )


def test_alpaca_pairwise_mindspeed_keys_and_chosen_columns():
    # MindSpeed-RL's orca config: prompt->question, no query column, chosen/rejected columns.
    handler = get_handler(
        "alpaca_pairwise", {"prompt": "question", "query": "", "system": "system"}
    )
    record = {"question": "Why?", "system": "Sys", "chosen": "Because.", "rejected": "No."}
    assert handler(record) == Pair([system("Sys"), user("Why?")], "Because.", "No.")
    assert reason_of(handler, {"question": "Q", "output": ["only one"]}) == "malformed_record"


def test_hh_rlhf_splits_shared_conversation():
    handler = get_handler("hh_rlhf")
    shared = "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: Tell me a fact."
    record = {
        "chosen": shared + "\n\nAssistant: Water boils at 100 C at sea level.",
        "rejected": shared + "\n\nAssistant: No.",
    }
    assert handler(record) == Pair(
        [user("Hi there"), assistant("Hello."), user("Tell me a fact.")],
        "Water boils at 100 C at sea level.",
        "No.",
    )
    empty = {"chosen": shared + "\n\nAssistant: ", "rejected": shared + "\n\nAssistant: x"}
    assert reason_of(handler, empty) == "empty_response"
    assert reason_of(handler, {"chosen": "no markers", "rejected": "x"}) == "malformed_record"


def test_stack_exchange_paired():
    handler = get_handler("stack_exchange_paired")
    record = {"question": "How?", "response_j": "Like this.", "response_k": "Dunno."}
    assert handler(record) == Pair([user("How?")], "Like this.", "Dunno.")


def test_helpsteer2_orientation_tie_and_abs_margin():
    handler = get_handler("helpsteer2_preference", margin="preference_strength")
    row = {"prompt": "P", "response_1": "one", "response_2": "two"}
    assert handler({**row, "preference_strength": 2}) == Pair([user("P")], "two", "one", 2.0)
    assert handler({**row, "preference_strength": -3}) == Pair([user("P")], "one", "two", 3.0)
    assert reason_of(handler, {**row, "preference_strength": 0}) == "tie"
    assert reason_of(handler, {**row, "preference_strength": "x"}) == "malformed_record"
    multi = "u1\n<extra_id_1>Assistant\na1\n<extra_id_1>User\nu2"
    pair = get_handler("helpsteer2_preference")({**row, "prompt": multi, "preference_strength": 1})
    assert pair.prompt == [user("u1"), assistant("a1"), user("u2")] and pair.margin is None
