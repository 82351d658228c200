"""Checkpoint converters between Hugging Face and megarm (megatron-core), for every
family in :mod:`megarm.families` (Qwen2 / Qwen2.5, Qwen3 dense, Llama 3.x).

- :mod:`ckpt_convert.mapping`: the tensor transforms of the families' weight tables,
  both directions
- :mod:`ckpt_convert.hf2mcore`: HF ``*ForCausalLM`` / ``*ForSequenceClassification``
  -> megarm torch_dist (any TP/PP) or legacy ``mp_rank_XX`` checkpoints
- :mod:`ckpt_convert.mcore2hf`: megarm torch_dist -> HF ``*ForSequenceClassification``
- :mod:`ckpt_convert.random_qwen2`: a random-weight Qwen2 checkpoint of any size
- :mod:`ckpt_convert.cli`: what their command lines share

Nothing here imports :mod:`megarm.training`.
"""
