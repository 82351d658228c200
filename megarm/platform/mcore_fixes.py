"""Fixes for megatron-core 0.16: its distributed optimizer running torch's Adam, and
its MoE router without transformer-engine.

Without apex or transformer-engine (every CPU machine, and CUDA machines without
them) the distributed optimizer falls back to ``torch.optim.Adam``, whose state
holds a per-parameter ``step`` tensor. Two code paths of megatron-core 0.16.1 get
that wrong when loading a checkpoint, breaking exact resume:

* the fully-reshardable loader copies ``step`` from per-parameter checkpoint
  tensors that never hold it (``KeyError: 'step'``);
* ``load_state_dict`` gives every parameter the *same* step tensor, which Adam
  then increments in place once per parameter (step 96 instead of 6).

:func:`install` patches both, and only when apex / TE are absent.

Without transformer-engine, ``megatron.core.transformer.moe.moe_utils`` never
defines ``te_general_gemm`` (its import fails as a whole), yet the router's gating
GEMM tests ``te_general_gemm is not None`` (``NameError`` in every MoE forward).
:func:`install` defines the names that import would have given as ``None``, so the
router takes its torch path (``torch.mm`` in the router dtype).
"""

from __future__ import annotations

import torch

_installed = False


def install() -> None:
    """Patch the distributed optimizer's load path (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    _define_absent_te_names()
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    cls = distrib_optimizer.DistributedOptimizer
    set_states = cls._set_main_param_and_optimizer_states
    load_state_dict = cls.load_state_dict

    def set_states_keeping_step(self, model_param, tensors):  # noqa: ANN001
        # The checkpoint's per-parameter tensors never hold "step"; keep the one
        # load_state_dict just restored from the param groups.
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state.get(main_param, {})
            if "step" in state:
                tensors = {**tensors, "step": state["step"].clone()}
        return set_states(self, model_param, tensors)

    def load_state_dict_unshared_step(self, state_dict):  # noqa: ANN001
        result = load_state_dict(self, state_dict)
        # One shared step tensor would be incremented once per parameter.
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
        return result

    cls._set_main_param_and_optimizer_states = set_states_keeping_step
    cls.load_state_dict = load_state_dict_unshared_step


# The names moe_utils imports from megatron-core's TE extension in one statement.
_TE_MOE_NAMES = (
    "fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss", "fused_permute",
    "fused_permute_with_probs", "fused_sort_chunks_by_index",
    "fused_sort_chunks_by_index_with_probs", "fused_topk_with_score_function",
    "fused_unpermute", "te_general_gemm",
)


def _define_absent_te_names() -> None:
    """``None`` for the TE functions moe_utils could not import (see the module)."""
    from megatron.core.transformer.moe import moe_utils

    if moe_utils.HAVE_TE:
        return
    for name in _TE_MOE_NAMES:
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)
