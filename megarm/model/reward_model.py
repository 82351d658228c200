"""The reward model: a megatron-core GPT trunk with a scalar value head.

It has the same submodules and parameter names as megatron-core's ``GPTModel``
(``embedding``, ``rotary_pos_emb``, ``decoder``) so checkpoints and the families'
weight tables (:mod:`megarm.families`) are shared with it, but it never builds
``GPTModel.output_layer``: the vocabulary projection (151,936 x hidden for Qwen2.5)
would be dead weight in a reward model. The last pipeline stage ends in
``value_head``, a bias-free ``Linear(hidden, 1)`` read at each sequence's reward token.
"""

from __future__ import annotations

import math

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor


class RewardModel(MegatronModule):
    """GPT trunk + value head. One instance is one pipeline stage (or model chunk).

    Args:
        config: megatron-core transformer config (built by :mod:`megarm.model.builder`).
        layer_spec: transformer layer spec (TE or local).
        vocab_size: padded vocabulary size (independent of TP).
        max_sequence_length: longest supported sequence.
        rotary_base: RoPE theta.
        pre_process: this stage holds the embedding.
        post_process: this stage holds the final norm and the value head.
        head_init_seed: seed for the value head's init, identical on every TP rank.
        vp_stage: virtual pipeline chunk index (interleaved schedule).
        rotary_scaling: Llama 3.1's RoPE frequency scaling (factor, low and high
            frequency factors, original context length); ``None``: plain RoPE.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_spec: ModuleSpec | TransformerBlockSubmodules,
        vocab_size: int,
        max_sequence_length: int,
        rotary_base: float,
        pre_process: bool = True,
        post_process: bool = True,
        head_init_seed: int = 1234,
        vp_stage: int | None = None,
        rotary_scaling: tuple[float, float, float, int] | None = None,
    ) -> None:
        super().__init__(config=config)
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        # The pipeline schedules read these.
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False
        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config,
                vocab_size=vocab_size,
                max_sequence_length=max_sequence_length,
                position_embedding_type="rope",
            )
        self.rotary_pos_emb = RotaryEmbedding(
            kv_channels=config.kv_channels,
            rotary_percent=1.0,
            rotary_base=rotary_base,
            use_cpu_initialization=config.use_cpu_initialization,
        )
        if rotary_scaling is not None:
            # Llama 3.1's frequency scaling. megatron-core's own switch for it fixes the
            # low/high frequency factors and the original length (1, 4, 8192); its
            # scaling function takes all four, which a checkpoint may set otherwise.
            self.rotary_pos_emb.inv_freq = self.rotary_pos_emb._apply_scaling(
                self.rotary_pos_emb.inv_freq, *rotary_scaling
            )
        self.decoder = TransformerBlock(
            config=config,
            spec=layer_spec,
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
        )
        if post_process:
            self.value_head = torch.nn.Linear(
                config.hidden_size, 1, bias=False, dtype=config.params_dtype
            )
            init_value_head(self.value_head.weight, config.hidden_size, head_init_seed)

    def set_input_tensor(self, input_tensor: Tensor | list[Tensor]) -> None:
        """Receive the previous pipeline stage's activations (called by the schedule)."""
        if isinstance(input_tensor, list):
            assert len(input_tensor) == 1, "a reward model stage takes one input tensor"
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Tensor | None,
        reward_index: Tensor | None = None,
        reward_row: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        plain_positions: bool | None = None,
        max_position: int | None = None,
    ) -> Tensor:
        """Run this stage.

        Args:
            input_ids: ``[b, s]`` token ids (read by the first stage only).
            position_ids: ``[b, s]`` positions. When they are not ``arange(s)`` in
                every row (packed sequences restart at 0) RoPE is applied per token.
            attention_mask: ``[b, 1, s, s]`` bool, True where attention is *blocked*;
                ``None`` means plain causal attention.
            reward_index: ``[n]`` position of each sequence's reward token in its row
                (last stage).
            reward_row: ``[n]`` row of each sequence's reward token; ``None`` means
                ``arange(b)`` (one sequence per row).
            packed_seq_params: THD packing (``b == 1``, sequences end to end,
                ``cu_seqlens``): attention and RoPE restart at every boundary;
                ``attention_mask`` is then ``None``.
            plain_positions: the caller knows every row's positions are
                ``arange(s)`` (True) or restart per packed sequence (False, with
                ``max_position`` their largest value); ``None``: look at
                ``position_ids`` (one device sync). Training passes both.
            max_position: largest position id when ``plain_positions`` is False.

        Returns:
            ``[n]`` rewards on the last stage; the hidden states ``[s, b, h]`` for
            the next stage otherwise.
        """
        decoder_input = (
            self.embedding(input_ids=input_ids, position_ids=position_ids)
            if self.pre_process
            else None
        )
        if packed_seq_params is not None:
            # megatron-core applies RoPE per cu_seqlens segment from position 0.
            rotary_pos_emb = self.rotary_pos_emb(packed_seq_params.max_seqlen_q)
        else:
            rotary_pos_emb = self.rotary(
                position_ids, input_ids.shape[1], plain_positions, max_position
            )
        hidden = self.decoder(
            hidden_states=decoder_input,
            attention_mask=attention_mask,
            rotary_pos_emb=rotary_pos_emb,
            packed_seq_params=packed_seq_params,
        )
        if not self.post_process:
            return hidden
        return self.rewards(hidden, reward_index, reward_row)

    def rotary(
        self,
        position_ids: Tensor | None,
        seq_length: int,
        plain: bool | None = None,
        max_position: int | None = None,
    ) -> Tensor:
        """RoPE frequencies: ``[s, 1, 1, d]`` for plain ``arange(s)`` positions (the
        fast path), else ``[s, b, 1, d]`` gathered per token, which megatron-core's
        bshd rotary application broadcasts over the batch. ``plain`` and
        ``max_position`` (host values from the collate step) spare the two device
        syncs of finding them out."""
        if position_ids is None:
            return self.rotary_pos_emb(seq_length)
        if plain is None:
            arange = torch.arange(seq_length, device=position_ids.device)
            plain = torch.equal(position_ids, arange.expand_as(position_ids))
        if plain:
            return self.rotary_pos_emb(seq_length)
        if max_position is None:
            max_position = int(position_ids.max())
        freqs = self.rotary_pos_emb(max_position + 1)  # [n, 1, 1, d]
        return freqs[:, 0][position_ids.t().to(freqs.device)]  # [s, b, 1, d]

    def rewards(
        self, hidden: Tensor, reward_index: Tensor, reward_row: Tensor | None = None
    ) -> Tensor:
        """Value head at each sequence's reward token: ``[s, b, h]`` -> ``[n]``.

        The head runs in fp32 whatever the parameter dtype: a bf16 product would
        round every reward to 8 mantissa bits (steps of ~0.03 at |r| 4-8), creating
        ties in pairwise accuracy and a coarse loss.
        """
        if self.config.sequence_parallel:
            # Each TP rank holds s/TP positions; gather so every rank sees every
            # row's reward token (the backward reduce-scatters the gradient).
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False
            )
        if reward_row is None:
            reward_row = torch.arange(hidden.shape[1], device=hidden.device)
        picked = hidden[reward_index, reward_row]  # [n, h]
        weight = self.value_head.weight
        return torch.nn.functional.linear(picked.float(), weight.float()).squeeze(-1)


def init_value_head(weight: Tensor, hidden_size: int, seed: int) -> None:
    """``N(0, 1/(hidden+1))`` from a private generator, so every TP rank (and every
    run with the same seed) gets the same head whatever the global RNG state is."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    values = torch.randn(weight.shape, generator=generator, dtype=torch.float32)
    with torch.no_grad():
        weight.copy_(values / math.sqrt(hidden_size + 1))
