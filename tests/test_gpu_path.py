"""The CUDA paths, checked on CPU: each test reaches the code that broke (or would
break) on a GPU, with what the CPU lacks put in place by a stand-in (a process group
without a CPU backend, a module with transformer-engine's extra state, a fake GPU
count, CUDA reported as present)."""

from __future__ import annotations

import ast
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megarm.testing import run_distributed
from tests.helpers import pair_batch, randomize_, tiny_config

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- host values


def _reduce_on_group_without_cpu_backend() -> dict:
    """Like NCCL, a default group whose only backend is for CUDA tensors: host values
    (metrics, the exit flag, gathered rewards) must still reduce."""
    import torch.distributed as dist

    from megarm import distributed, platform
    from megarm.training.loop import Trainer
    from megarm.training.loss import STAT_KEYS, reduce_stats

    platform.dist_backend = lambda: "cuda:gloo"  # gloo for CUDA tensors, nothing for CPU
    distributed.init(1, 1)
    rank = dist.get_rank()
    out: dict = {}
    try:
        dist.all_reduce(torch.ones(1))
        out["plain_all_reduce"] = "ok"
    except RuntimeError as exc:
        out["plain_all_reduce"] = str(exc)
    stats = torch.arange(len(STAT_KEYS), dtype=torch.float64) + rank
    out["metrics"] = reduce_stats([{"stats": stats}], contribute=True)
    cfg = tiny_config()
    fake = SimpleNamespace(cfg=cfg, sigterm=rank == 1, start_time=time.time(), iteration=1,
                           is_logging_rank=False)
    out["exit"] = Trainer.should_exit(fake)
    out["gathered"] = distributed.all_gather_objects({"rank": rank})
    out["to_rank0"] = distributed.gather_objects(rank * 10)
    distributed.barrier()
    return out


def test_host_values_reduce_on_a_group_without_a_cpu_backend():
    results = run_distributed(_reduce_on_group_without_cpu_backend, 2, timeout=180)
    for rank, out in enumerate(results):
        # The stand-in really lacks a CPU backend, as NCCL does.
        assert "No backend type associated with device type cpu" in out["plain_all_reduce"]
        # Sums over both ranks: stats 0..9 on rank 0 and 1..10 on rank 1.
        assert out["metrics"]["pairs"] == 2 + 3
        assert out["metrics"]["loss"] == pytest.approx((0 + 1) / 5)
        assert out["exit"] is True  # rank 1's SIGTERM stops both
        assert out["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert out["to_rank0"] == ([0, 10] if rank == 0 else None)


COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "gather",
    "gather_object", "broadcast", "broadcast_object_list", "barrier", "reduce",
    "reduce_scatter", "reduce_scatter_tensor", "scatter", "scatter_object_list", "send",
    "recv", "monitored_barrier",
}


def _distributed_names(tree: ast.AST) -> set[str]:
    """Local names bound to torch.distributed in a module (``dist``, ``torch.distributed``)."""
    names = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "torch.distributed" and alias.asname:
                    names.add(alias.asname)
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and node.names:
            for alias in node.names:
                if alias.name == "distributed":
                    names.add(alias.asname or "distributed")
    return names


def test_every_collective_goes_through_megarm_distributed():
    """No module but megarm/distributed.py calls torch.distributed's collectives:
    that module decides on which group (and device) host values are reduced."""
    offenders = []
    for path in sorted(
        p for d in ("megarm", "ckpt_convert", "tools") for p in (ROOT / d).rglob("*.py")
    ):
        if path == ROOT / "megarm/distributed.py":
            continue
        tree = ast.parse(path.read_text())
        names = _distributed_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
                bad = [a.name for a in node.names if a.name in COLLECTIVES]
                if bad:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {bad}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr in COLLECTIVES and ast.unparse(node.func.value) in names:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node.func)}")
    assert not offenders, "collectives outside megarm/distributed.py:\n" + "\n".join(offenders)


# --------------------------------------------------------------------------- transformer-engine


def _load_with_te_extra_state(save_dir: str) -> dict:
    """Core attention with TE's extra state that megatron-core's sharded state dict
    leaves out (TEDotProductAttention without learnable softmax): save, then load."""
    from megarm import distributed
    from megarm.checkpoint import load_model_weights, save_checkpoint
    from megarm.model.attention import SDPAttention
    from megarm.model.builder import build_model

    SDPAttention.get_extra_state = lambda self: torch.tensor([7.0])
    SDPAttention.set_extra_state = lambda self, state: None
    SDPAttention.sharded_state_dict = lambda self, prefix="", sharded_offsets=(), metadata=None: {}
    cfg = tiny_config()
    distributed.init(1, 1)
    (model,) = build_model(cfg)
    assert any(k.endswith("core_attention._extra_state") for k in model.state_dict())
    save_checkpoint(save_dir, 1, [model], {"iteration": 1})
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    load_model_weights(save_dir, [model])
    after = model.state_dict()
    return {"restored": all(torch.equal(before[k], after[k]) for k in before)}


def test_checkpoint_load_keeps_te_extra_state_the_checkpoint_lacks(tmp_path):
    (out,) = run_distributed(_load_with_te_extra_state, 1, str(tmp_path / "ckpt"))
    assert out["restored"]


def _load_full_state_into_te_named_model() -> dict:
    """A model whose state dict uses transformer-engine's layer-norm names (fused into
    linear_qkv / linear_fc1) takes a full state dict spelled with local names."""
    from megarm import distributed
    from megarm.model.builder import build_model
    from megarm.model.sharding import TE_NAMES, load_full_state_dict

    cfg = tiny_config()
    distributed.init(1, 1)
    (model,) = build_model(cfg)
    full = randomize_(model.state_dict())

    def to_te(module, state, prefix, local_metadata):  # state-dict hook
        for name in list(state):
            for local, te in TE_NAMES.items():
                if name.endswith(local):
                    state[name[: -len(local)] + te] = state.pop(name)
        return state

    def from_te(state, prefix, *args):  # load pre-hook
        for name in list(state):
            for local, te in TE_NAMES.items():
                if name.endswith(te):
                    state[name[: -len(te)] + local] = state.pop(name)

    model._register_state_dict_hook(to_te)
    model._register_load_state_dict_pre_hook(from_te)
    assert any(k.endswith("linear_qkv.layer_norm_weight") for k in model.state_dict())
    load_full_state_dict([model], full, cfg)
    local = {k: v for k, v in model.named_parameters()}
    return {"equal": all(torch.equal(local[k], full[k]) for k in full)}


@pytest.mark.slow
def test_full_state_dict_loads_into_a_te_named_model():
    (out,) = run_distributed(_load_full_state_into_te_named_model, 1)
    assert out["equal"]


def _unfused_attention_bf16_with_te_but_no_apex() -> dict:
    """TE importable, apex's softmax extension not: megatron-core's unfused attention
    in bf16 on a kernel-eligible shape must not import scaled_masked_softmax_cuda."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megarm import distributed, platform
    from megarm.model.builder import transformer_config

    distributed.init(1, 1)
    platform.is_cuda = lambda: True
    platform.has_transformer_engine = lambda: True
    # TE's fused RoPE is part of "TE importable"; megatron-core checks it exists.
    rope_utils.fused_apply_rotary_pos_emb = lambda *a, **k: None
    rope_utils.fused_apply_rotary_pos_emb_thd = lambda *a, **k: None
    cfg = tiny_config("model.params_dtype=bf16", "model.attention_backend=unfused")
    config = transformer_config(cfg)
    attention = DotProductAttention(config, 1, AttnMaskType.causal, "self")
    s, b, heads, groups, d = 32, 1, 4, 2, 16
    q = torch.randn(s, b, heads, d, dtype=torch.bfloat16)
    kv = torch.randn(s, b, groups, d, dtype=torch.bfloat16)
    out = attention(q, kv, kv, None, AttnMaskType.causal)
    return {"fusion": config.masked_softmax_fusion, "shape": tuple(out.shape)}


def test_unfused_attention_with_te_and_no_apex_runs_without_apex_kernels():
    (out,) = run_distributed(_unfused_attention_bf16_with_te_but_no_apex, 1)
    assert out["fusion"] is False
    assert out["shape"] == (32, 1, 64)


# --------------------------------------------------------------------------- launch and dtype


def test_fp16_is_refused_before_anything_starts():
    from megarm.preflight import validate

    problems = validate(tiny_config("model.params_dtype=fp16"), world_size=1)
    assert [p.key for p in problems] == ["model.params_dtype"]
    assert "bf16" in problems[0].message


def test_more_local_ranks_than_gpus_is_refused(monkeypatch):
    from megarm import platform

    calls = []
    monkeypatch.setattr(platform, "is_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.delenv("MEGARM_DIST_BACKEND", raising=False)
    platform.set_local_device(0)
    with pytest.raises(platform.DeviceError, match=r"local rank 1 .* 1 GPU"):
        platform.set_local_device(1)
    # Under gloo, ranks may share the one GPU (a TP=2 check on a one-GPU machine).
    monkeypatch.setenv("MEGARM_DIST_BACKEND", "gloo")
    platform.set_local_device(1)
    assert calls == [0, 0]


def test_cuda_environment_turns_on_ordered_kernel_launches(monkeypatch):
    from megarm import platform

    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    platform.cuda_environment()
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "4")
    platform.cuda_environment()
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "4"  # the user's choice stands
    assert not any("CUDA_DEVICE_MAX_CONNECTIONS" in w or "async grad" in w
                   for w in platform._EXPECTED_WARNINGS)


# --------------------------------------------------------------------------- precision, syncs


def _bf16_rewards() -> dict:
    from megarm import distributed
    from megarm.model.builder import build_model

    cfg = tiny_config("model.params_dtype=bf16")
    distributed.init(1, 1)
    (model,) = build_model(cfg)
    model.load_state_dict({k: v.bfloat16() for k, v in randomize_(model.state_dict()).items()})
    batch = pair_batch(4, 16, 200)
    captured = {}
    model.decoder.register_forward_hook(lambda m, i, o: captured.update(hidden=o))
    with torch.no_grad():
        rewards = model(batch.tokens, batch.position_ids, None, batch.reward_index)
    hidden = captured["hidden"][batch.reward_index, torch.arange(8)]
    expected = hidden.float() @ model.value_head.weight.float().t()
    return {"rewards": rewards, "expected": expected.squeeze(-1)}


@pytest.mark.slow
def test_value_head_computes_in_fp32_in_a_bf16_model():
    (out,) = run_distributed(_bf16_rewards, 1)
    rewards = out["rewards"]
    assert rewards.dtype == torch.float32
    torch.testing.assert_close(rewards, out["expected"], rtol=0, atol=1e-6)
    # Not rounded to bf16's 8 mantissa bits.
    assert (rewards.bfloat16().float() != rewards).sum() >= 6


# Every way a value travels from the device to the host (each one a stall on a GPU):
# scalar and list reads, copies to the CPU, and the ops whose output size depends on
# the data (nonzero, boolean-mask indexing), which sync to learn it.
_HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__,
               torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__,
               torch.Tensor.numpy, torch.equal, torch.Tensor.cpu, torch.Tensor.nonzero,
               torch.nonzero, torch.masked_select, torch.Tensor.masked_select}


def _host_read(func, args) -> str | None:  # noqa: ANN001
    """The name of the host read ``func(*args)`` is, or None."""
    if func in _HOST_READS:
        return func.__name__
    if func is torch.Tensor.__getitem__ and len(args) > 1:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
            return "boolean-mask indexing"
    return None


class _NoHostReads(torch.overrides.TorchFunctionMode):
    """Raises on every device -> host read: each one is a stall on a GPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = _host_read(func, args)
        if name:
            raise AssertionError(f"host read in the step: {name}")
        return func(*args, **(kwargs or {}))


class _CountHostReads(torch.overrides.TorchFunctionMode):
    """Counts device -> host reads, by the megarm line that made each."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = _host_read(func, args)
        if name:
            import traceback

            frames = [f for f in traceback.extract_stack()[:-1] if "/megarm/" in f.filename]
            where = f"{frames[-1].filename.rsplit('/megarm/', 1)[1]}:{frames[-1].lineno}" if frames else "?"
            self.sites.append(f"{name} at {where}")
        return func(*args, **(kwargs or {}))


def _step_without_host_reads() -> dict:
    from megarm import distributed
    from megarm.data.packing import collate_packed, collate_thd
    from megarm.model.attention import PackedSegments, SDPAttention
    from megarm.model.builder import build_model
    from megarm.model.step import forward_step
    from megarm.training.data import to_pair_batch
    from megarm.training.loss import loss_func

    cfg = tiny_config("data.packing=true")
    distributed.init(1, 1)
    (model,) = build_model(cfg)
    samples = [
        {"chosen_input_ids": list(range(5, 5 + n)), "chosen_labels": [-100] * n,
         "rejected_input_ids": list(range(9, 9 + n - 1)), "rejected_labels": [-100] * (n - 1),
         "margin": 0.0}
        for n in (3, 5)
    ]
    rows = to_pair_batch(collate_packed(samples, pad_token_id=0, seq_length=16))
    padded = pair_batch(2, 12, 200)
    checked = []
    for batch in (rows, padded):
        with torch.no_grad(), _NoHostReads():
            output, loss = forward_step(iter([batch]), model, loss_func)
            loss(output)
        checked.append(True)
    thd = to_pair_batch(collate_thd(samples, pad_token_id=0))
    attention = SDPAttention(model.config, 1, None, "self")
    params = thd.packed_seq_params()
    assert isinstance(params, PackedSegments) and params.seq_lengths is not None
    t = int(thd.tokens.shape[1])
    q = torch.randn(t, 4, 16)
    kv = torch.randn(t, 2, 16)
    with _NoHostReads():
        attention(q, kv, kv, None, packed_seq_params=params)
    return {"checked": checked}


def test_training_step_reads_nothing_back_from_the_device():
    """Padded and row-packed micro-batches: megarm's forward and loss read no device
    value on the host (RoPE layout and THD lengths come from the collate step)."""
    (out,) = run_distributed(_step_without_host_reads, 1)
    assert out["checked"] == [True, True]


def _lm_step_without_host_reads() -> dict:
    """The joint (critique) and SFT steps: supervised positions, targets and their
    count come from the collate step; the LM head, the vocab-parallel cross-entropy,
    the joint loss and its backward read nothing back."""
    from functools import partial

    from megarm import distributed
    from megarm.data.dataset import collate_pairs
    from megarm.data.packing import collate_packed
    from megarm.model.builder import build_model
    from megarm.model.step import forward_step
    from megarm.training.data import to_pair_batch
    from megarm.training.loss import loss_func as training_loss

    distributed.init(1, 1)
    checked = []
    pairs = [
        {"chosen_input_ids": list(range(5, 5 + n)), "chosen_labels": [-100] * 2 + list(range(7, 5 + n)),
         "rejected_input_ids": list(range(9, 8 + n)), "rejected_labels": [-100] * 2 + list(range(11, 8 + n)),
         "margin": 0.0}
        for n in (4, 6)
    ]
    records = [{"input_ids": p["chosen_input_ids"], "labels": p["chosen_labels"]} for p in pairs]
    for objective, samples, weights in (("joint", pairs, (0.7, 0.3)), ("sft", records, (0.0, 1.0))):
        cfg = tiny_config("data.packing=true", f"training.objective={objective}",
                          "model.tie_word_embeddings=true")
        (model,) = build_model(cfg)
        # (A THD forward is left out, as above: megatron-core's unfused THD RoPE reads
        # cu_seqlens back; on a GPU transformer-engine's fused RoPE does not.)
        for collated in (collate_pairs(samples, 0), collate_packed(samples, 0, 16)):
            batch = to_pair_batch(collated, lm=True)
            batch.lm_scale = 0.5
            assert batch.lm_tokens > 0
            step = partial(forward_step, loss=partial(training_loss, rm_weight=weights[0], lm_weight=weights[1]))
            with _NoHostReads():
                output, loss_func = step(iter([batch]), model)
                loss, _ = loss_func(output)
                loss.backward()
            checked.append(objective)
    return {"checked": checked}


def test_lm_and_joint_steps_read_nothing_back_from_the_device():
    (out,) = run_distributed(_lm_step_without_host_reads, 1)
    assert out["checked"] == ["joint"] * 2 + ["sft"] * 2


def _iteration_host_reads(variants: list[tuple[str, ...]]) -> list[list[str]]:
    """The host reads of one whole training iteration (schedule, forward, backward,
    optimizer step, metrics and the log line) per config variant. The micro-batches
    are collated before it (on a GPU they are built on the host and copied in)."""
    from itertools import islice

    from megatron.core import parallel_state
    from megatron.core.rerun_state_machine import destroy_rerun_state_machine

    from megarm import distributed
    from megarm.training import loop
    from megarm.training.loop import Trainer

    out = []
    for overrides in variants:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
            destroy_rerun_state_machine()
        cfg = tiny_config("training.train_iters=1", "training.eval_interval=0",
                          "data.synthetic_num_pairs=32", "data.split=100,0,0", *overrides)
        distributed.init_from_config(cfg)
        trainer = Trainer(cfg)
        trainer.train_stream = iter(list(islice(trainer.train_stream, trainer.num_microbatches)))
        trainer.evaluate = lambda: None
        loop.after_training = lambda *a, **k: None  # the reward statistics after training
        counter = _CountHostReads()
        with counter:
            trainer.train()
        trainer.close()
        out.append(counter.sites)
    return out


def test_a_training_iteration_reads_back_a_fixed_few_values():
    """A whole iteration, THD-packed and padded, 2 vs 4 layers and 1 vs 2
    micro-batches: the host reads are the step's metrics and the grad-norm check,
    once per step: their number does not grow with layers or micro-batches."""
    layouts = {"thd": ("data.packing=true",), "padded": ("data.packing=false",)}
    variants = []
    for layout in layouts.values():
        for layers, micro in ((2, 4), (4, 2)):  # global batch 4: 1 or 2 micro-batches
            variants.append((*layout, f"model.num_layers={layers}", f"training.micro_batch_size={micro}",
                             "training.global_batch_size=4"))
    (found,) = run_distributed(_iteration_host_reads, 1, variants)
    for name, (small, large) in zip(layouts, zip(found[::2], found[1::2], strict=True), strict=True):
        print(name, len(small), "host reads;", sorted(set(small)))
        assert len(small) == len(large), (name, small, large)
        # 6 measured: the step's stats (training/loss.py) and the grad-norm check
        # (training/optimizer.py), each through one host all-reduce (distributed.py)
        assert 0 < len(small) <= 8, (name, small)
        where = {s.split(" at ")[-1].split(":")[0] for s in small}
        assert where <= {"training/loss.py", "training/optimizer.py", "distributed.py"}, where
