"""The CPU compatibility layer for megatron-core, the device facts, and run_distributed.

``cpu_compat.install()`` patches the process for good, so every check of the layer
runs in a spawned rank (one spawn for all of them: :func:`_probe_compat_layer`
collects observations, and each test below asserts one piece of them).
"""

from __future__ import annotations

import os
import re
import time

import pytest

from megarm.testing import RankFailure, run_distributed

# --------------------------------------------------------------------------- rank bodies
# Module-level so spawned ranks can import them by name.


def _probe_compat_layer() -> dict:
    """Activate the layer in a fresh process and record what torch and megatron do."""
    import logging

    import torch

    from megarm import platform
    from megarm.platform import cpu_compat

    out: dict = {"installed_before": cpu_compat.is_installed()}
    platform.activate()
    platform.activate()  # idempotent
    out["installed_after"] = cpu_compat.is_installed()
    out["is_cuda"] = platform.is_cuda()

    # ---- devices
    out["current_device"] = torch.cuda.current_device()
    base = torch.arange(4.0)
    made = {
        "empty(device='cuda')": torch.empty(3, device="cuda"),
        "empty(device='cuda:0')": torch.empty(3, device="cuda:0"),
        "empty(device=torch.device('cuda'))": torch.empty(3, device=torch.device("cuda")),
        "zeros(device=current_device())": torch.zeros(2, device=torch.cuda.current_device()),
        "arange(device='cuda')": torch.arange(3, device="cuda"),
        "tensor(device='cuda')": torch.tensor([1.0, 2.0], device="cuda"),
        "ones(pin_memory=True)": torch.ones(2, pin_memory=True),
        "t.cuda()": base.cuda(),
        "t.cuda(non_blocking=True)": base.cuda(non_blocking=True),
        "t.to('cuda')": base.to("cuda"),
        "t.to('cuda', float64)": base.to("cuda", torch.float64),
        "t.to(device='cuda')": base.to(device="cuda"),
        "t.to(0)": base.to(0),
        "t.new_zeros(device='cuda')": base.new_zeros(2, device="cuda"),
    }
    out["devices"] = {name: t.device.type for name, t in made.items()}
    out["pinned"] = made["ones(pin_memory=True)"].is_pinned()
    out["values"] = {
        "t.cuda()": made["t.cuda()"].tolist(),
        "t.to('cuda')": made["t.to('cuda')"].tolist(),
        "t.to('cuda', float64).dtype": str(made["t.to('cuda', float64)"].dtype),
        "zeros": made["zeros(device=current_device())"].tolist(),
        "ones": made["ones(pin_memory=True)"].tolist(),
        "tensor": made["tensor(device='cuda')"].tolist(),
    }
    out["to_float64_keeps_cpu_tensor"] = base.to(torch.float64).dtype == torch.float64

    # autograd runs backward functions without the TorchFunctionMode: megatron's
    # device=torch.cuda.current_device() allocations there must still land on CPU
    class _Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            out["backward_alloc_device"] = torch.zeros(
                1, device=torch.cuda.current_device()
            ).device.type
            return grad * 2

    leaf = torch.ones(2, requires_grad=True)
    _Double.apply(leaf).sum().backward()
    out["backward_grad"] = leaf.grad.tolist()

    # ---- RNG state functions
    out["rng_state_equal"] = torch.equal(torch.cuda.get_rng_state(), torch.get_rng_state())
    state = torch.cuda.get_rng_state()
    first = torch.rand(5)
    torch.cuda.set_rng_state(state)
    out["set_rng_state_replays"] = torch.equal(first, torch.rand(5))
    torch.cuda.manual_seed(77)
    seeded = torch.rand(3)
    out["cuda_manual_seed_seeds_cpu"] = torch.equal(
        seeded, torch.rand(3, generator=torch.Generator().manual_seed(77))
    )

    # ---- tensor.type() as megatron-core sees it
    t = torch.ones(2)
    scope = {"__name__": "megatron.fake", "t": t, "d": t.double()}
    exec("r = t.type(); rd = d.type()", scope)
    out["type_in_megatron"] = scope["r"]
    out["double_type_in_megatron"] = scope["rd"]
    out["type_here"] = t.type()
    scope = {"__name__": "megatron_lookalike", "t": t}
    exec("r = t.type()", scope)
    out["type_in_lookalike"] = scope["r"]
    out["type_with_arg_here"] = t.type(torch.float64).dtype == torch.float64

    # ---- stream / synchronize / nvtx no-ops
    out["synchronize"] = torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.stream(stream):
        inside = torch.ones(1) + 1
    torch.cuda.nvtx.range_push("x")
    torch.cuda.nvtx.range_pop()
    torch.cuda.empty_cache()
    out["stream_ops_ok"] = inside.tolist() == [2.0]

    # ---- platform facts
    out["dist_backend"] = platform.dist_backend()
    out["device_type"] = platform.device().type
    platform.synchronize()
    out["max_memory_allocated"] = platform.max_memory_allocated()
    out["has_te"] = platform.has_transformer_engine()
    out["has_apex"] = platform.has_apex()

    # ---- megatron-core's RNG tracker in an initialised one-rank group
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mcore_random

    from megarm import distributed

    distributed.init(seed=5)
    records: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger(mcore_random.__name__).addHandler(_Collect())

    def draws() -> dict:
        tensor_parallel.model_parallel_cuda_manual_seed(123)
        tracker = tensor_parallel.get_cuda_rng_tracker()
        default_1 = torch.rand(4)
        with tracker.fork():
            fork_1 = torch.rand(4)
        default_2 = torch.rand(4)
        with tracker.fork():
            fork_2 = torch.rand(4)
        return {
            "default": torch.cat([default_1, default_2]).tolist(),
            "fork_1": fork_1.tolist(),
            "fork_2": fork_2.tolist(),
        }

    out["rng_run_1"] = draws()
    torch.rand(100)  # consume the default generator between the runs
    out["rng_run_2"] = draws()
    out["rng_warnings"] = [r for r in records if "CPU RNG state changed" in r]

    # ---- a real megatron-core assert on tensor.type(): grad clipping
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.tensor([3.0, 4.0])
    clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=5.0)
    out["clipped_grad"] = param.grad.tolist()

    # ---- what run_distributed gives a rank: torchrun's variables, the caller's env, gloo
    import torch.distributed as dist

    out["env"] = {
        key: os.environ[key]
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MEGARM_TEST_MARKER")
    }
    total = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(total)
    out["all_reduce_sum"] = total.item()
    out["backend"] = dist.get_backend()
    return out


def _raise() -> int:
    raise ValueError("this rank exploded on purpose")


def _hang_on_rank_one(seconds: float) -> int:
    rank = int(os.environ["RANK"])
    if rank == 1:
        time.sleep(seconds)
        os._exit(0)  # leave without ever reporting a result
    return rank


# --------------------------------------------------------------------------- the layer


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    """The probe on two ranks (one spawn serves the layer and run_distributed tests).

    ``MEGARM_DEVICE=cpu`` makes a GPU machine take the CPU path too.
    """
    env = {"MEGARM_TEST_MARKER": "m", "MEGARM_DEVICE": "cpu"}
    return run_distributed(_probe_compat_layer, 2, timeout=240, env=env)


@pytest.fixture(scope="module")
def probe(ranks) -> dict:
    return ranks[0]


def test_install_is_lazy_and_idempotent(probe):
    assert probe["installed_before"] is False  # importing megarm.platform changes nothing
    assert probe["installed_after"] is True
    assert probe["is_cuda"] is False


def test_current_device_is_the_cpu(probe):
    import torch

    # the CPU device itself (not the index 0), so that allocations made outside the
    # TorchFunctionMode (autograd's backward) with device=current_device() work too
    assert probe["current_device"] == torch.device("cpu")
    assert probe["backward_alloc_device"] == "cpu"
    assert probe["backward_grad"] == [2.0, 2.0]


def test_cuda_devices_land_on_cpu(probe):
    not_cpu = {name: dev for name, dev in probe["devices"].items() if dev != "cpu"}
    assert not_cpu == {}
    assert len(probe["devices"]) == 14


def test_moved_tensors_keep_their_values(probe):
    values = probe["values"]
    assert values["t.cuda()"] == [0.0, 1.0, 2.0, 3.0]
    assert values["t.to('cuda')"] == [0.0, 1.0, 2.0, 3.0]
    assert values["t.to('cuda', float64).dtype"] == "torch.float64"
    assert values["zeros"] == [0.0, 0.0]
    assert values["ones"] == [1.0, 1.0]
    assert values["tensor"] == [1.0, 2.0]
    assert probe["to_float64_keeps_cpu_tensor"] is True


def test_pin_memory_is_dropped(probe):
    assert probe["pinned"] is False


def test_cuda_rng_state_is_the_cpu_generator(probe):
    assert probe["rng_state_equal"] is True
    assert probe["set_rng_state_replays"] is True
    assert probe["cuda_manual_seed_seeds_cpu"] is True


def test_rng_tracker_forks_are_reproducible(probe):
    import torch

    run_1, run_2 = probe["rng_run_1"], probe["rng_run_2"]
    # two forks of the model-parallel state continue one stream: different numbers
    assert run_1["fork_1"] != run_1["fork_2"]
    # re-seeding replays the same sequence, whatever happened in between
    assert run_2 == run_1
    # the forked state is megatron's tensor-parallel seed (seed + 2718 + tp_rank) on
    # the CPU generator, and forks leave the default stream (seeded 123) untouched
    tp_gen = torch.Generator().manual_seed(123 + 2718)
    expected_forks = torch.rand(8, generator=tp_gen).tolist()
    assert run_1["fork_1"] + run_1["fork_2"] == pytest.approx(expected_forks)
    default_gen = torch.Generator().manual_seed(123)
    assert run_1["default"] == pytest.approx(torch.rand(8, generator=default_gen).tolist())


def test_rng_fork_warning_is_filtered(probe):
    assert probe["rng_warnings"] == []


def test_tensor_type_reports_cuda_to_megatron_only(probe):
    assert probe["type_in_megatron"] == "torch.cuda.FloatTensor"
    assert probe["double_type_in_megatron"] == "torch.cuda.DoubleTensor"
    assert probe["type_here"] == "torch.FloatTensor"
    assert probe["type_in_lookalike"] == "torch.FloatTensor"
    assert probe["type_with_arg_here"] is True


def test_megatron_grad_clipping_runs_on_cpu(probe):
    # asserts grad.type() == 'torch.cuda.FloatTensor' and builds a device='cuda' buffer
    assert probe["clipped_grad"] == pytest.approx([0.6, 0.8], rel=1e-5)


def test_synchronize_and_streams_are_no_ops(probe):
    assert probe["synchronize"] is None
    assert probe["stream_ops_ok"] is True


def test_platform_facts_on_cpu(probe):
    assert probe["dist_backend"] == "gloo"
    assert probe["device_type"] == "cpu"
    assert probe["max_memory_allocated"] == 0
    assert probe["has_te"] is False
    assert probe["has_apex"] is False


def test_megarm_device_cpu_forces_cpu(monkeypatch):
    """In-process: no install, only the cached device decision is exercised."""
    import torch

    from megarm import platform

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        monkeypatch.setenv("MEGARM_DEVICE", "cpu")
        platform.is_cuda.cache_clear()
        assert platform.is_cuda() is False
        assert platform.dist_backend() == "gloo"
        assert platform.device() == torch.device("cpu")
        monkeypatch.setenv("MEGARM_DEVICE", "CPU")
        platform.is_cuda.cache_clear()
        assert platform.is_cuda() is False
        monkeypatch.delenv("MEGARM_DEVICE")
        platform.is_cuda.cache_clear()
        assert platform.is_cuda() is True
        assert platform.dist_backend() == "nccl"
    finally:
        platform.is_cuda.cache_clear()


# --------------------------------------------------------------------------- run_distributed


def test_run_distributed_returns_results_by_rank(ranks):
    assert len(ranks) == 2
    for rank, result in enumerate(ranks):
        assert result["env"] == {
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MEGARM_TEST_MARKER": "m",  # run_distributed(env=...) reaches the rank
        }
        assert result["all_reduce_sum"] == 3.0  # 1 + 2 over the gloo group
        assert result["backend"] == "gloo"
    # every rank of a TP=1 group draws the same model-parallel RNG stream
    assert ranks[1]["rng_run_1"] == ranks[0]["rng_run_1"]


def test_failing_rank_surfaces_its_traceback():
    with pytest.raises(RankFailure) as exc:
        run_distributed(_raise, 1, timeout=240)
    text = str(exc.value)
    assert "rank 0 of 1 failed" in text
    assert "ValueError: this rank exploded on purpose" in text
    assert "Traceback" in text and "in _raise" in text


@pytest.mark.slow
def test_hanging_rank_times_out_naming_missing_ranks():
    timeout = 5
    start = time.monotonic()
    with pytest.raises(RankFailure) as exc:
        run_distributed(_hang_on_rank_one, 2, timeout, timeout=timeout)
    # rank 1 never reports; rank 0 is listed too when a loaded machine could not
    # even start it within the (startup-inclusive) timeout
    assert re.fullmatch(r"ranks \[(0, )?1\] of 2 gave no result within 5s", str(exc.value))
    assert time.monotonic() - start < 120
