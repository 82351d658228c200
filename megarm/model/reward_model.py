"""The reward model: a megatron-core GPT trunk with a scalar value head.

It has the same submodules and parameter names as megatron-core's ``GPTModel``
(``embedding``, ``rotary_pos_emb``, ``decoder``) so checkpoints and the families'
weight tables (:mod:`megarm.families`) are shared with it. A pure reward model never
builds ``GPTModel.output_layer``: the vocabulary projection (151,936 x hidden for
Qwen2.5) would be dead weight. The last pipeline stage ends in ``value_head``, a
bias-free ``Linear(hidden, 1)`` read at each sequence's reward token.

Critique models (``training.objective: sft | joint``) also build ``output_layer``,
megatron-core's vocab-parallel ``ColumnParallelLinear`` as in ``GPTModel``, tied to
the input embedding when the HF model ties them (on a later pipeline stage a copy
that megatron-core keeps equal to the embedding: same init, gradients all-reduced
over the embedding group). The LM head only sees the hidden states of supervised
positions (gathered first), so no ``[tokens, vocab]`` logits exist for the prompt
and response.
"""

from __future__ import annotations

import copy
import math

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
from torch import Tensor

from megarm.distributed import sum_context
from megarm.model.attention import PackedSegments, SDPAttention, rope_in_sdpa, with_packed_rope
from megarm.model.context_split import held_positions


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
        value_head: build the value head (last stage).
        num_labels: its outputs (1: one reward; more: ``training.objective:
            regression``, rewards ``[n, num_labels]``).
        output_layer: build the LM output layer (last stage).
        tie_output: the output layer is the input embedding (``output_layer`` only).
        real_vocab_size: the tokenizer-facing vocabulary (``model.vocab_size``); the
            padding rows above it are left out of the LM's softmax, as the HF model
            has no such rows.
    """

    # megatron-core's handling of an output layer tied to the embedding across
    # pipeline stages (GPTModel's), without LanguageModule.__init__ (it would set
    # transformer-engine's attention environment for every reward model).
    setup_embeddings_and_output_layer = LanguageModule.setup_embeddings_and_output_layer
    shared_embedding_or_output_weight = LanguageModule.shared_embedding_or_output_weight
    tie_embeddings_and_output_weights_state_dict = (
        LanguageModule.tie_embeddings_and_output_weights_state_dict
    )
    _is_in_embd_group = LanguageModule._is_in_embd_group

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
        value_head: bool = True,
        num_labels: int = 1,
        output_layer: bool = False,
        tie_output: bool = False,
        real_vocab_size: int | None = None,
    ) -> None:
        super().__init__(config=config)
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.vp_size = config.virtual_pipeline_model_parallel_size
        # The pipeline schedules read these.
        self.model_type = ModelType.encoder_or_decoder
        # finalize_model_grads all-reduces the tied copy's gradient when this is set.
        self.share_embeddings_and_output_weights = output_layer and tie_output
        # False: the checkpoint to load has no value head (an SFT model); it keeps its init.
        self.value_head_in_checkpoint = True
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
        self.rope_in_sdpa = rope_in_sdpa(config) and any(
            isinstance(m, SDPAttention) for m in self.decoder.modules()
        )
        self.value_head: torch.nn.Linear | None = None
        if post_process and value_head:
            self.value_head = torch.nn.Linear(
                config.hidden_size, num_labels, bias=False, dtype=config.params_dtype
            )
            init_value_head(self.value_head.weight, config.hidden_size, head_init_seed)
        self.output_layer: tensor_parallel.ColumnParallelLinear | None = None
        if output_layer:
            self._build_output_layer(config, vocab_size, real_vocab_size)
        self._register_load_state_dict_pre_hook(self._keep_fresh_value_head)

    def _build_output_layer(
        self, config: TransformerConfig, vocab_size: int, real_vocab_size: int | None
    ) -> None:
        """The LM head (critique models, SFT) on the last stage, and the process groups
        megatron-core's tied-embedding code reads on every stage that shares it."""
        pre_process = self.pre_process
        if self.post_process:
            # The head reads positions gathered from the whole sequence (lm_losses), so
            # it runs as a plain column-parallel layer even under sequence parallelism.
            head_config = copy.copy(config)
            head_config.sequence_parallel = False
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                vocab_size,
                config=head_config,
                init_method=config.init_method,
                bias=False,
                skip_bias_add=False,
                gather_output=False,
                skip_weight_param_allocation=pre_process and self.share_embeddings_and_output_weights,
            )
            # This TP rank's vocabulary shard holds real_local_vocab real ids, then padding.
            part = vocab_size // parallel_state.get_tensor_model_parallel_world_size()
            start = part * parallel_state.get_tensor_model_parallel_rank()
            real = vocab_size if real_vocab_size is None else real_vocab_size
            self.real_local_vocab = min(max(real - start, 0), part)
        # What megatron-core's tied-embedding code reads.
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.embd_group = parallel_state.get_embedding_group(check_initialized=False)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()

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
        lm_index: Tensor | None = None,
        lm_target: Tensor | None = None,
    ) -> Tensor | tuple[Tensor | None, Tensor]:
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
            lm_index: ``[m]`` positions whose next token is supervised, as flat
                indices ``position * b + row`` into the ``[s, b]`` sequence layout
                (last stage, with an output layer).
            lm_target: ``[m]`` the token id each of those positions must predict.

        Returns:
            ``[n]`` rewards on the last stage (``(rewards or None, [m] per-token
            cross-entropy)`` when ``lm_index`` is given); the hidden states
            ``[s, b, h]`` for the next stage otherwise.
        """
        decoder_input = (
            self.embedding(input_ids=input_ids, position_ids=position_ids)
            if self.pre_process
            else None
        )
        if packed_seq_params is not None:
            # megatron-core applies RoPE per cu_seqlens segment from position 0 (under
            # CP to this rank's chunks: it divides the padded cu_seqlens by CP).
            # packed_seq: never megatron-core's own CP slicing of the frequencies.
            rotary_pos_emb = self.rotary_pos_emb(packed_seq_params.max_seqlen_q, packed_seq=True)
            if (self.rope_in_sdpa and position_ids is not None
                    and isinstance(packed_seq_params, PackedSegments)):
                # SDPAttention rotates with cos/sin computed once for all layers.
                packed_seq_params = with_packed_rope(packed_seq_params, rotary_pos_emb, position_ids)
                rotary_pos_emb = None
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
        if lm_index is None:
            return self.rewards(hidden, reward_index, reward_row)
        hidden = self.full_sequence(hidden)
        rewards = None
        if self.value_head is not None:
            rewards = self.value(hidden, reward_index, reward_row)
        return rewards, self.lm_losses(hidden, lm_index, lm_target)

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
            cp = self.config.context_parallel_size
            if cp == 1:
                return self.rotary_pos_emb(seq_length)
            # Rows cut for CP (megarm.model.context_split): this rank's two chunks of
            # the whole row's table (megatron-core's own slicing needs CUDA).
            freqs = self.rotary_pos_emb(seq_length * cp, packed_seq=True)
            rank = parallel_state.get_context_parallel_rank()
            keep = torch.from_numpy(held_positions(seq_length * cp, rank, cp))
            return freqs.index_select(0, keep.to(freqs.device))
        if max_position is None:
            max_position = int(position_ids.max())
        # packed_seq: the whole table; a batch cut for CP carries its own positions.
        freqs = self.rotary_pos_emb(max_position + 1, packed_seq=True)  # [n, 1, 1, d]
        return freqs[:, 0][position_ids.t().to(freqs.device)]  # [s, b, 1, d]

    def rewards(
        self, hidden: Tensor, reward_index: Tensor, reward_row: Tensor | None = None
    ) -> Tensor:
        """Value head at each sequence's reward token: ``[s, b, h]`` -> ``[n]`` (``[n,
        num_labels]`` for a multi-output head)."""
        return self.value(self.full_sequence(hidden), reward_index, reward_row)

    def full_sequence(self, hidden: Tensor) -> Tensor:
        """The last stage's ``[s, b, h]`` hidden states; under sequence parallelism
        each TP rank holds s/TP positions, so they are gathered for the heads, which
        read any position (the backward keeps each rank's slice of the gradient,
        which every rank computes whole and identical)."""
        if not self.config.sequence_parallel:
            return hidden
        return tensor_parallel.gather_from_sequence_parallel_region(
            hidden, tensor_parallel_output_grad=False
        )

    def value(
        self, hidden: Tensor, reward_index: Tensor, reward_row: Tensor | None = None
    ) -> Tensor:
        """Value head on full-sequence hidden states, at each reward token.

        The head runs in fp32 whatever the parameter dtype: a bf16 product would
        round every reward to 8 mantissa bits (steps of ~0.03 at |r| 4-8), creating
        ties in pairwise accuracy and a coarse loss.

        Under context parallelism a sequence's reward token is on one CP rank
        (``reward_index`` -1 on the others): each rank's rewards are summed over the
        CP group, so every rank has all of them and the loss is the CP=1 loss.
        """
        if reward_row is None:
            reward_row = torch.arange(hidden.shape[1], device=hidden.device)
        held = reward_index >= 0
        picked = hidden[reward_index.clamp(min=0), reward_row]  # [n, h]
        weight = self.value_head.weight
        rewards = torch.nn.functional.linear(picked.float(), weight.float()).squeeze(-1)
        if self.config.context_parallel_size == 1:
            return rewards
        held = held.view(-1, *([1] * (rewards.dim() - 1)))  # [n] or [n, labels]
        rewards = torch.where(held, rewards, torch.zeros_like(rewards))
        return sum_context(rewards, parallel_state.get_context_parallel_group())

    def lm_losses(self, hidden: Tensor, lm_index: Tensor, lm_target: Tensor) -> Tensor:
        """Next-token cross-entropy ``[m]`` at the ``lm_index`` positions of the
        full-sequence hidden states: only those rows reach the output layer, so the
        logits are ``[m, vocab / TP]``, never ``[s * b, vocab / TP]``.

        megatron-core's vocab-parallel cross-entropy reduces over the TP shards; the
        vocabulary padding above ``real_vocab_size`` is masked out (-inf), so the
        loss is the HF model's on the same weights.
        """
        s, b, h = hidden.shape
        picked = hidden.reshape(s * b, h).index_select(0, lm_index).unsqueeze(1)  # [m, 1, h]
        weight = None
        if self.share_embeddings_and_output_weights:
            weight = self.shared_embedding_or_output_weight()
        logits, _ = self.output_layer(picked, weight=weight)  # [m, 1, vocab / TP]
        part = logits.shape[-1]
        if self.real_local_vocab < part:
            padding = torch.arange(self.real_local_vocab, part, device=logits.device)
            logits = logits.index_fill(-1, padding, float("-inf"))
        losses = tensor_parallel.vocab_parallel_cross_entropy(
            logits.float(), lm_target.unsqueeze(1)
        )
        return losses.squeeze(1)

    def load_state_dict_strict(self, state: dict) -> None:
        """Load ``state`` strictly about weights (not about TE's ``_extra_state``):
        what the checkpoint format calls with the state it read for this chunk."""
        from megarm.model.sharding import load_state_dict_strict

        load_state_dict_strict(self, state)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict:
        """megatron-core's sharded state dict; a tied output layer on a later pipeline
        stage is stored as a replica of the first stage's embedding (as GPTModel
        does), and a value head the checkpoint lacks is not asked for."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.output_layer is not None and self.share_embeddings_and_output_weights:
            self.tie_embeddings_and_output_weights_state_dict(
                sharded,
                f"{prefix}output_layer.weight",
                f"{prefix}embedding.word_embeddings.weight",
                metadata,
            )
        if not self.value_head_in_checkpoint:
            sharded.pop(f"{prefix}value_head.weight", None)
        return sharded

    def _keep_fresh_value_head(self, state_dict: dict, prefix: str, *args) -> None:  # noqa: ANN002
        if not self.value_head_in_checkpoint and self.value_head is not None:
            state_dict.setdefault(f"{prefix}value_head.weight", self.value_head.weight.detach())


def init_value_head(weight: Tensor, hidden_size: int, seed: int) -> None:
    """``N(0, 1/(hidden+1))`` from a private generator, so every TP rank (and every
    run with the same seed) gets the same head whatever the global RNG state is."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    values = torch.randn(weight.shape, generator=generator, dtype=torch.float32)
    with torch.no_grad():
        weight.copy_(values / math.sqrt(hidden_size + 1))
