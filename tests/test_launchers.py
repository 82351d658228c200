"""The launchers as a user meets them: --help, one message for a bad config, nodes
that never meet, the SLURM example, and two "nodes" on this machine training exactly
like one node (examples/rm/*.sh, tools/launch.py)."""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from megarm.testing import free_port
from tests.test_wandb import wandb_history

ROOT = Path(__file__).resolve().parents[1]
RM = ROOT / "examples" / "rm"
TINY = "configs/orm_trainer_tiny.yaml"
ENV_VARS = ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "GPUS_PER_NODE", "PYTHON",
            "SOCKET_IFNAME", "CONFIG", "RDZV_TIMEOUT")


def launch(script: str, *args: str, timeout: float = 120, **env: str):
    """Run a launcher the way a user does (bash, repository root, their environment)."""
    full = {k: v for k, v in os.environ.items() if k not in ENV_VARS + ("DRY_RUN",)}
    full.update({"PYTHON": sys.executable, "MASTER_PORT": str(free_port()), **env})
    return subprocess.run(
        ["bash", str(RM / script), *args], cwd=ROOT, env=full, capture_output=True,
        text=True, timeout=timeout,
    )


@pytest.mark.parametrize("script", ["orm_trainer_qwen25_7b.sh", "orm_trainer_qwen25_32b.sh"])
def test_help_prints_usage_and_train_options_without_waiting(script):
    done = launch(script, "--help", timeout=60)
    assert done.returncode == 0, done.stderr
    for name in ENV_VARS:
        assert name in done.stdout, name
    assert "EVERY" in done.stdout  # every node runs it
    assert "usage: python -m megarm.train" in done.stdout and "--config" in done.stdout
    config = script.replace(".sh", ".yaml")
    assert f"configs/{config}" in done.stdout  # the config it would use
    # No arguments: the usage, and nothing started.
    bare = launch(script, timeout=60)
    assert bare.returncode == 2 and "NODE_RANK" in bare.stderr and "[megarm]" not in bare.stderr


def test_config_problems_are_printed_once_before_anything_starts():
    # 3 processes cannot hold TP=2: the launcher stops before torchrun.
    done = launch("orm_trainer.sh", TINY, "training.train_iters=2", GPUS_PER_NODE="3")
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert out.count("world size 3 is not divisible by TP x PP = 2 x 1") == 1
    assert "configs/orm_trainer_qwen25_7b.yaml: 8 GPUs = NNODES 1 x GPUS_PER_NODE 8" in out
    assert "configs/orm_trainer_qwen25_32b.yaml: 16 GPUs = NNODES 2 x GPUS_PER_NODE 8" in out
    assert "waiting for" not in out and "ChildFailedError" not in out and "Traceback" not in out


@pytest.mark.slow
def test_train_under_plain_torchrun_prints_a_config_problem_once():
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port()), "-m", "megarm.train", "--config", TINY,
         "training.global_batch_size=3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert out.count("training.global_batch_size: 3 is not divisible") == 1, out


def test_a_python_without_torch_is_named():
    bare = "/usr/bin/python3"
    if not Path(bare).exists() or subprocess.run([bare, "-c", "import torch"],
                                                 capture_output=True).returncode == 0:
        pytest.skip("needs a system python3 without torch")
    done = launch("orm_trainer.sh", TINY, PYTHON=bare)
    assert done.returncode == 2
    assert "No module named 'torch'" in done.stderr and "tools/setup_env.sh" in done.stderr


def test_launcher_finds_the_project_venv():
    venv = ROOT / ".venv" / "bin" / "python"
    if not venv.exists():
        pytest.skip("no .venv in this checkout")
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS + ("MEGARM_VENV",)}
    done = subprocess.run(
        ["bash", str(RM / "orm_trainer.sh"), TINY, "training.train_iters=3"], cwd=ROOT,
        env=dict(env, DRY_RUN="1", GPUS_PER_NODE="2"), capture_output=True, text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    command = shlex.split(done.stdout.strip().splitlines()[-1])
    assert command[0] == str(venv)
    assert command[command.index("--config") + 1] == TINY and command[-1] == "training.train_iters=3"


def test_nodes_that_never_meet_give_up_with_one_clear_line():
    done = launch("orm_trainer.sh", TINY, NNODES="2", NODE_RANK="0", GPUS_PER_NODE="1",
                  RDZV_TIMEOUT="2", timeout=90)
    assert done.returncode == 1, done.stderr
    assert "node 0: waiting for 2 nodes at 127.0.0.1:" in done.stderr
    assert "gave up waiting for 2 nodes" in done.stderr and "RDZV_TIMEOUT" in done.stderr
    assert "Traceback" not in done.stderr and "frame #" not in done.stderr


def test_slurm_example_starts_one_launcher_per_node(tmp_path):
    """sbatch's script under stand-in scontrol/srun: srun runs its command once per
    node with SLURM_NODEID set, as SLURM does; the launchers only print torchrun's
    command (DRY_RUN=1)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho node-a\necho node-b\n')
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        'while [[ "$1" == --* ]]; do shift; done\n'
        'for i in $(seq 0 $((SLURM_JOB_NUM_NODES - 1))); do SLURM_NODEID=$i "$@" || exit; done\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID="7",
               SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node-[a-b]", DRY_RUN="1",
               PYTHON=sys.executable, CONFIG=TINY, GPUS_PER_NODE="1")
    done = subprocess.run(
        ["bash", str(RM / "slurm_orm_trainer.sbatch"), "training.train_iters=2"], cwd=tmp_path,
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    commands = [shlex.split(x) for x in done.stdout.splitlines() if "torch.distributed.run" in x]
    assert len(commands) == 2

    def option(command, name):
        return command[command.index(name) + 1]

    assert [option(c, "--node-rank") for c in commands] == ["0", "1"]
    for command in commands:
        assert option(command, "--nnodes") == "2" and option(command, "--master-addr") == "node-a"
        assert option(command, "--config") == TINY and command[-1] == "training.train_iters=2"


# --------------------------------------------------------------------------- two nodes

TINY_OVERRIDES = [
    "model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=256",
    "model.max_position_embeddings=64", "model.params_dtype=fp32",
    "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=1",
    "data.seq_length=32", "data.synthetic_num_pairs=64", "training.micro_batch_size=1",
    "training.global_batch_size=2", "training.train_iters=3", "checkpoint.save=null",
    "checkpoint.save_interval=null", "data.tokenizer_name_or_path=null",
]


def train_losses(log_dir: Path) -> list[float]:
    records = [json.loads(x) for x in (log_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["iteration"] for r in train] == [1, 2, 3]
    return [r["loss"] for r in train]


@pytest.mark.slow
def test_two_nodes_train_exactly_like_one_node(tmp_path):
    """One node with 2 processes vs two launchers (NNODES=2, NODE_RANK 0/1, one
    process each, loopback master): the same TP=2 run, so the same losses. The
    one-node run also logs to W&B (offline) when wandb is installed."""
    try:
        import wandb  # noqa: F401

        with_wandb = ["logging.wandb_project=megarm-test", "logging.wandb_mode=offline"]
    except ImportError:
        with_wandb = []
    script = "orm_trainer_qwen25_32b.sh"  # its config, shrunk by the overrides
    one = launch(script, *TINY_OVERRIDES, *with_wandb,
                 f"logging.log_dir={tmp_path / 'one'}", GPUS_PER_NODE="2", NNODES="1",
                 WANDB_SILENT="true", timeout=600)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]

    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS + ("DRY_RUN",)}
    env.update(PYTHON=sys.executable, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NNODES="2",
               GPUS_PER_NODE="1", RDZV_TIMEOUT="300")
    args = ["bash", str(RM / script), *TINY_OVERRIDES,
            f"logging.log_dir={tmp_path / 'two'}"]
    nodes = [
        subprocess.Popen(args, cwd=ROOT, env=dict(env, NODE_RANK=str(rank)),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (1, 0)  # node 1 first: it waits for the master
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(x[-3000:] for x in outputs)
    for rank, out in zip((1, 0), outputs):
        assert f"node {rank}: waiting for 2 nodes at 127.0.0.1:{port}" in out

    expected, got = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert all(math.isfinite(x) for x in expected) and len(set(expected)) == 3
    for a, b in zip(expected, got):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7), (expected, got)

    if with_wandb:
        (run_file,) = (tmp_path / "one" / "wandb").glob("offline-run-*/run-*.wandb")
        rows = [r for r in wandb_history(run_file) if "train/loss" in r]
        assert [r["_step"] for r in rows] == [1, 2, 3]
        assert [r["train/loss"] for r in rows] == pytest.approx(expected, rel=1e-12)


@pytest.mark.slow
def test_sigterm_to_the_launcher_saves_and_ends_with_one_line(tmp_path):
    """SLURM's preemption signal: the workers finish their step and save, the
    launcher prints one line (not torchrun's SignalException traceback)."""
    import signal
    import time

    full = {k: v for k, v in os.environ.items() if k not in ENV_VARS + ("DRY_RUN",)}
    full.update({"PYTHON": sys.executable, "MASTER_PORT": str(free_port()), "GPUS_PER_NODE": "2"})
    log = tmp_path / "log"
    proc = subprocess.Popen(
        ["bash", str(RM / "orm_trainer.sh"), TINY, "training.train_iters=100000",
         "training.eval_interval=0", f"checkpoint.save={tmp_path / 'ckpt'}", f"logging.log_dir={log}"],
        cwd=ROOT, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (log / "metrics.jsonl").is_file():
            time.sleep(0.2)
        assert (log / "metrics.jsonl").is_file(), "training never started"
        os.killpg(proc.pid, signal.SIGTERM)  # what SLURM sends the job step
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "stopped by SIGTERM" in out and "SignalException" not in out and "Traceback" not in out
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").is_file(), out[-2000:]


def test_an_occupied_master_port_is_named_at_once():
    """Issue #25: a taken MASTER_PORT failed at once but was reported as "gave up waiting
    for 1 nodes ... after 600 s" with multi-node advice."""
    import socket
    import time

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        done = launch("orm_trainer.sh", TINY, MASTER_PORT=str(port), GPUS_PER_NODE="2",
                      timeout=90)
    assert done.returncode == 2, done.stderr
    (line,) = [x for x in done.stderr.splitlines() if "error:" in x]
    assert f"MASTER_PORT {port} is already in use" in line and "MASTER_PORT=" in line
    assert "gave up waiting" not in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - started < 60


def test_the_demos_pick_a_free_master_port(monkeypatch):
    """Issue #25: the demos' fixed ports 29531/29532 made two demos on one machine collide."""
    import socket

    from megarm.demo_common import master_port

    monkeypatch.delenv("MASTER_PORT", raising=False)
    port = int(master_port())
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))  # free: binding it succeeds
    monkeypatch.setenv("MASTER_PORT", "12345")
    assert master_port() == "12345"
    for demo in ("demo.py", "demo_cloud.py"):
        text = (ROOT / "megarm" / demo).read_text()
        assert "2953" not in text and "master_port()" in text
