"""Checkpoint converters between Hugging Face Qwen2 / Qwen2.5 and megarm (megatron-core).

- :mod:`ckpt_convert.qwen2_mapping`: the one name/transform table both directions use
- :mod:`ckpt_convert.hf2mcore`: HF ``Qwen2ForCausalLM`` / ``Qwen2ForSequenceClassification``
  -> megarm torch_dist (any TP/PP) or legacy ``mp_rank_XX`` checkpoints
- :mod:`ckpt_convert.mcore2hf`: megarm torch_dist -> HF ``Qwen2ForSequenceClassification``
"""
