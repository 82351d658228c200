"""The reward model: megatron-core GPT trunk + scalar value head, how it is built,
sharded and loaded, and its forward step under the pipeline schedules."""

from megarm import platform

# Before megatron-core is first imported: its import-time warnings about absent
# optional kernels are expected on CPU machines.
platform.quiet_expected_warnings()
