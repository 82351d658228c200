"""torchrun for megarm's launchers (examples/rm/*.sh), one node or many.

    python tools/launch.py --nnodes 2 --node-rank 0 --nproc-per-node 8 \\
        --master-addr 10.0.0.1 --master-port 6000 --rdzv-timeout 600 \\
        -- [--config X.yaml | X.yaml] [section.key=value ...]

Before any process starts it checks, once per node, that this python can run megarm
(torch and megarm importable) and that the config is sound for NNODES x
NPROC_PER_NODE ranks, and prints the problems once (naming the process counts the
shipped configs expect when the world size does not fit). Then it runs torchrun's
own launcher in this process (static rendezvous at MASTER_ADDR:MASTER_PORT), so that
nodes that never meet give one clear line after ``--rdzv-timeout`` seconds instead of
a traceback, and failed ranks give a one-line summary instead of torchrun's
per-rank table. The ranks' own output, the error included, is printed above it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "[megarm]"


def say(message: str) -> None:
    """A launcher line on stderr (the ranks print on stdout)."""
    print(f"{PREFIX} {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="tools/launch.py", description=__doc__.splitlines()[0])
    p.add_argument("--nnodes", type=int, default=1, help="nodes in the job")
    p.add_argument("--node-rank", type=int, default=0, help="this node's index, 0..nnodes-1")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes on this node")
    p.add_argument("--master-addr", default="127.0.0.1", help="address of node 0")
    p.add_argument("--master-port", type=int, default=6000, help="a free TCP port on node 0")
    p.add_argument(
        "--rdzv-timeout", type=int, default=600,
        help="seconds to wait for every node to join before giving up",
    )
    p.add_argument("--default-config", help="config used when the arguments name none")
    p.add_argument("--dry-run", action="store_true", help="check, print the torchrun command, stop")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then megarm.train's arguments")
    return p


def training_arguments(train_args: list[str], default_config: str | None) -> list[str]:
    """megarm.train's arguments with exactly one config: ``--config X`` or a leading
    ``X.yaml`` among them, else ``default_config``."""
    args = train_args[1:] if train_args[:1] == ["--"] else list(train_args)
    if args and args[0].endswith((".yaml", ".yml")) and "=" not in args[0]:
        args = ["--config", *args]
    named = any(a == "--config" or a.startswith("--config=") for a in args)
    if not named and default_config:
        args = ["--config", default_config, *args]
    return args


def shipped_layouts() -> list[str]:
    """One line per shipped config: the processes it expects and its TP x PP."""
    from megarm.config import load_config

    rows = []
    for path in (ROOT / "configs").glob("orm_trainer_*.yaml"):
        text = path.read_text()
        p = load_config(path).parallel
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        gpus = re.search(r"^# gpus: (\d+)$", text, re.M)
        nodes = re.search(r"\((\d+) node\(s\) x (\d+) ", text)
        where = f"{gpus.group(1)} GPUs" if gpus else f"{tp * pp} processes (CPU or GPU)"
        if nodes:
            where += f" = NNODES {nodes.group(1)} x GPUS_PER_NODE {nodes.group(2)}"
        line = f"  {path.relative_to(ROOT)}: {where} (TP {tp} x PP {pp}: a multiple of {tp * pp})"
        rows.append((int(gpus.group(1)) if gpus else 0, tp * pp, line))
    return [line for *_, line in sorted(rows)]


def check_config(args: list[str], world_size: int) -> int:
    """0 when megarm.train will accept ``args`` at ``world_size``; else print why, once."""
    from megarm.config import ConfigError
    from megarm.preflight import resolve
    from megarm.train import build_parser as train_parser

    parsed = train_parser().parse_args(args)
    try:
        resolve(parsed.config, parsed.overrides, world_size)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if any(i.key in ("parallel", "training.global_batch_size") for i in exc.issues):
            say(f"this launch has {world_size} process(es); the shipped configs expect:")
            print("\n".join(shipped_layouts()), file=sys.stderr)
        return 2
    return 0


def importable(python: str) -> str | None:
    """Why this python cannot run megarm (None when it can). Imports torch with its
    C++ log quiet in this process only: a node waiting for the others would print a
    stack trace per connection retry; the ranks get the user's setting back."""
    saved = os.environ.get("TORCH_CPP_LOG_LEVEL")
    os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"  # read once, when torch loads
    try:
        import torch  # noqa: F401

        import megarm.config  # noqa: F401
    except ImportError as exc:
        return (
            f"{python} cannot run megarm ({exc}). Set it up with `bash tools/setup_env.sh` "
            "(the project's .venv, which the launchers use when it exists) or point PYTHON "
            "at a python that has megarm and torch installed"
        )
    finally:
        if saved is None:
            os.environ.pop("TORCH_CPP_LOG_LEVEL")
        else:
            os.environ["TORCH_CPP_LOG_LEVEL"] = saved
    return None


def port_in_use(port: int) -> bool:
    """Whether something listens on TCP ``port`` of this machine, where node 0's
    rendezvous store must listen (a port only in TIME_WAIT is free: torch reuses it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return True
    return False


def busy_port_message(port: int) -> str:
    """The one line for an occupied MASTER_PORT, with a port that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        free = sock.getsockname()[1]
    return (
        f"error: MASTER_PORT {port} is already in use on this node (another run or program "
        f"listens on it); choose a free port, e.g. MASTER_PORT={free}"
    )


def torchrun_arguments(a: argparse.Namespace, train: list[str]) -> list[str]:
    """The torchrun command line (after ``python -m torch.distributed.run``)."""
    return [
        "--nnodes", str(a.nnodes), "--node-rank", str(a.node_rank),
        "--nproc-per-node", str(a.nproc_per_node),
        "--master-addr", a.master_addr, "--master-port", str(a.master_port),
        "--rdzv-conf", f"timeout={a.rdzv_timeout}",
        "-m", "megarm.train", *train,
    ]


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2: bad config or set-up)."""
    a = build_parser().parse_args(argv)
    if not 0 <= a.node_rank < a.nnodes:
        say(f"NODE_RANK {a.node_rank} must be within 0..{a.nnodes - 1} (NNODES {a.nnodes})")
        return 2
    problem = importable(sys.executable)
    if problem:
        say(f"error: {problem}")
        return 2
    train = training_arguments(a.train_args, a.default_config)
    world = a.nnodes * a.nproc_per_node
    if check_config(train, world):
        return 2
    command = torchrun_arguments(a, train)
    if a.dry_run:
        print(shlex.join([sys.executable, "-m", "torch.distributed.run", *command]))
        return 0
    where = f"{a.master_addr}:{a.master_port}"
    # Node 0 hosts the rendezvous: a port taken there failed at once but was reported
    # as nodes that never met, after the whole --rdzv-timeout, with multi-node advice.
    if a.node_rank == 0 and port_in_use(a.master_port):
        say(busy_port_message(a.master_port))
        return 2
    if a.nnodes > 1:
        say(
            f"node {a.node_rank}: waiting for {a.nnodes} nodes at {where} "
            f"({a.nproc_per_node} process(es) each, world {world}; giving up after "
            f"{a.rdzv_timeout} s)"
        )
    else:
        say(f"{a.nproc_per_node} process(es) on this node, rendezvous at {where}")

    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    try:
        run(get_args_parser().parse_args(command))
    except ChildFailedError as exc:
        rank, first = exc.get_first_failure()
        how = (f"signal {first.signal_name()}" if first.exitcode < 0
               else f"exit status {first.exitcode}")
        say(
            f"training failed: rank {rank} ended first, with {how}; "
            f"{len(exc.failures)} rank(s) of this node failed (their output is above)"
        )
        return 2 if first.exitcode == 2 else 1
    except DistError as exc:  # the nodes never met at MASTER_ADDR:MASTER_PORT
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        if a.node_rank == 0 and "address already in use" in str(exc).lower():
            say(busy_port_message(a.master_port))  # taken between the check and the start
            return 2
        say(
            f"node {a.node_rank}: gave up waiting for {a.nnodes} nodes at {where} after "
            f"{a.rdzv_timeout} s ({detail}). Start the launcher on every node with the same "
            "MASTER_ADDR, MASTER_PORT and NNODES and its own NODE_RANK; check that "
            f"{where} is reachable from every node (firewall, SOCKET_IFNAME); "
            "RDZV_TIMEOUT sets the wait"
        )
        return 1
    except SignalException as exc:  # SIGTERM/SIGINT to torchrun (SLURM preemption, Ctrl-C)
        say(
            f"node {a.node_rank}: stopped by {exc.sigval.name}; the workers were told to stop "
            "(a SIGTERM'd run saves its checkpoint first when checkpoint.save is set)"
        )
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
