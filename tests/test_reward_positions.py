"""``training.reward_offsets`` (issue 24, section 1): the reward supervised at the
trained token and ``k`` tokens before it (ChatML's ``<|im_end|>`` before the newline
``apply_chat_template`` ends with), one Bradley-Terry loss per position, in one
forward. The extra positions stay in their own sequence, the model gathers them like
the trained one, and the loss is the mean of the per-position losses (hand-computed)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from megarm.testing import run_distributed
from megarm.training.data import add_reward_offsets
from megarm.training.loss import loss_func
from tests.helpers import pair_batch, tiny_config


def test_offsets_are_gathered_within_each_sequence():
    batch = pair_batch(3, 12, 250, seed=1)
    index = batch.reward_index.clone()
    out = add_reward_offsets(copy.deepcopy(batch), [1, 2])
    assert out.reward_index.tolist() == [*index.tolist(), *(index - 1).tolist(), *(index - 2).tolist()]
    assert out.reward_row.tolist() == list(range(6)) * 3
    # Packed rows: positions restart per sequence; an offset never crosses into the
    # sequence before (a 2-token sequence at row 0, positions 5-6).
    packed = copy.deepcopy(batch)
    packed.position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, *range(5)]] * 6)
    packed.reward_index = torch.tensor([6] * 6)
    packed.reward_row = torch.arange(6)
    moved = add_reward_offsets(packed, [1, 3])
    assert moved.reward_index.tolist() == [6] * 6 + [5] * 6 + [5] * 6
    # Off, or SFT records: unchanged.
    assert add_reward_offsets(copy.deepcopy(batch), []).reward_index.tolist() == index.tolist()


def test_the_loss_is_the_mean_of_each_positions_bradley_terry_loss():
    batch = add_reward_offsets(pair_batch(4, 10, 250, seed=2), [1])
    rewards = torch.randn(16, generator=torch.Generator().manual_seed(0))
    loss, out = loss_func(batch, rewards)

    def bt(r: torch.Tensor) -> torch.Tensor:
        chosen, rejected = r.chunk(2)
        return -F.logsigmoid(chosen - rejected - batch.margin).mean()

    assert torch.allclose(loss, (bt(rewards[:8]) + bt(rewards[8:])) / 2, atol=1e-6)
    # The consistency term: coef * mean((r_k - r)^2) over the extra positions.
    pulled, _ = loss_func(batch, rewards, consistency_coef=0.5)
    assert torch.allclose(pulled - loss, 0.5 * ((rewards[8:] - rewards[:8]) ** 2).mean(), atol=1e-6)
    # The metrics are the trained position's: as without the offsets.
    plain = pair_batch(4, 10, 250, seed=2)
    _, reference = loss_func(plain, rewards[:8])
    assert torch.equal(out["stats"], reference["stats"])
    assert torch.equal(out["rewards"], rewards[:8])


def _model_rewards(offsets: list[int]) -> tuple[list[float], list[float], list[float]]:
    from megarm import distributed
    from megarm.model.builder import build_model
    from megarm.model.step import model_forward

    cfg = tiny_config()
    distributed.init(1, 1, seed=0)
    (model,) = build_model(cfg)
    model.eval()
    batch = pair_batch(3, 16, 250, seed=3)
    earlier = copy.deepcopy(batch)
    earlier.reward_index = batch.reward_index - offsets[0]
    with torch.no_grad():
        both = model_forward(add_reward_offsets(copy.deepcopy(batch), offsets), model)
        return both.tolist(), model_forward(batch, model).tolist(), model_forward(earlier, model).tolist()


def test_the_model_gathers_the_extra_positions_in_the_same_forward():
    (found,) = run_distributed(_model_rewards, 1, [1], timeout=300)
    both, trained, earlier = found
    assert torch.allclose(torch.tensor(both), torch.tensor(trained + earlier), atol=1e-6)
    assert max(abs(a - b) for a, b in zip(trained, earlier, strict=True)) > 1e-3
