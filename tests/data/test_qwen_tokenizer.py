"""The offline Qwen2.5 tokenizer reproduces Qwen2.5's ids, specials and chat template."""

from __future__ import annotations

import json

import pytest

from megarm.data.tokenizer import (
    QWEN25_ADDED_TOKENS,
    TokenizerError,
    load_tokenizer,
    qwen_tiktoken_path,
    vocab_sha256,
)


def test_reference_ids(qwen_tokenizer):
    assert qwen_tokenizer.encode("Hello world", add_special_tokens=False) == [9707, 1879]
    assert qwen_tokenizer.encode("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False) == [
        151644,
        872,
        198,
        13048,
        151645,
    ]


def test_specials_and_sizes(qwen_tokenizer):
    assert len(qwen_tokenizer) == 151665
    ids = [qwen_tokenizer.convert_tokens_to_ids(text) for text, _ in QWEN25_ADDED_TOKENS]
    assert ids == list(range(151643, 151665))
    assert (qwen_tokenizer.pad_token, qwen_tokenizer.pad_token_id) == ("<|endoftext|>", 151643)
    assert (qwen_tokenizer.eos_token, qwen_tokenizer.eos_token_id) == ("<|im_end|>", 151645)
    assert qwen_tokenizer.is_fast


def test_matches_tiktoken_ranks(qwen_tokenizer):
    """Byte-level BPE from derived merges gives tiktoken's ids on varied text."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    from megarm.data.tokenizer import QWEN_PRETOKENIZE_REGEX

    encoding = tiktoken.Encoding(
        "qwen",
        pat_str=QWEN_PRETOKENIZE_REGEX,
        mergeable_ranks=load_tiktoken_bpe(str(qwen_tiktoken_path())),
        special_tokens={},
    )
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "  leading spaces,\ttabs\n\n\nand newlines  ",
        "naïve café — “quotes” 1234567890 3.14159",
        "中文分词测试：你好，世界！",
        "emoji 😀👍🏽 and symbols ∑∫√ <html><b>x</b></html>",
        "def f(x):\n    return x ** 2  # comment\n",
        "I'm sure they'll say we've done it. DON'T SHOUT",
    ]
    for text in texts:
        assert qwen_tokenizer.encode(text, add_special_tokens=False) == encoding.encode(text), text
        assert qwen_tokenizer.decode(encoding.encode(text)) == text


def test_chat_template(qwen_tokenizer, qwen_system):
    messages = [{"role": "user", "content": "Hi"}]
    assert qwen_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ) == (qwen_system + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    assert qwen_tokenizer.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_config_and_vocab_hash(qwen_tokenizer_dir, qwen_tokenizer):
    config = json.loads((qwen_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"
    # sha256 over the sorted (token, id) items of Qwen2.5's 151,665-entry vocabulary
    assert vocab_sha256(qwen_tokenizer) == (
        "698c955b0b438a535083d1771ef8b41069afba4b3d51a482558bdb68ea55e800"
    )


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(TokenizerError, match="not supported"):
        load_tokenizer(str(tmp_path), tokenizer_type="SentencePiece")
