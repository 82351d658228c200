"""Training: forward step and loss, the loop, evaluation, checkpoints, metrics."""

from megarm import platform

# Before megatron-core is first imported: its import-time warnings about absent
# optional kernels are expected on CPU machines.
platform.quiet_expected_warnings()
