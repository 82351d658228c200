"""Processes and the machine (issue 14 items 9-11, 13): what megarm starts opens no
port it does not need and does not outlive its run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A world of one: report every listening TCP socket this process holds (from /proc).
_LISTENERS = r"""
import os
from megarm import distributed
distributed.init(1, 1)
inodes = set()
for fd in os.listdir("/proc/self/fd"):
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        continue
    if target.startswith("socket:["):
        inodes.add(target[8:-1])
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    with open(table) as fh:
        for line in list(fh)[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                print("LISTEN", fields[1])
distributed.teardown()
print("DONE")
"""


def test_a_world_of_one_opens_no_store_on_any_interface():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GLOO_SOCKET_IFNAME")}
    env.update(OMP_NUM_THREADS="1", MASTER_PORT="54999")  # what the converters used to set
    done = subprocess.run([sys.executable, "-c", _LISTENERS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert "DONE" in done.stdout, done.stderr[-3000:]
    addresses = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("LISTEN")]
    # address:port in hex; an all-zero address is 0.0.0.0 / :: (every interface).
    wildcard = [a for a in addresses if set(a.split(":")[0]) == {"0"}]
    assert wildcard == [], f"listening on every interface: {wildcard}"
    assert not any(a.endswith(f":{54999:04X}") for a in addresses)  # no store at MASTER_PORT


def test_converters_do_not_pick_ports():
    for name in ("hf2mcore.py", "mcore2hf.py"):
        text = (ROOT / "ckpt_convert" / name).read_text()
        assert "free_port" not in text and "MASTER_PORT" not in text, name
