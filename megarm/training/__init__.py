"""Training: the losses (:mod:`~megarm.training.loss`), the loop
(:mod:`~megarm.training.loop`), its data streams (:mod:`~megarm.training.data`),
metrics, and the FLOP and memory estimates. The forward step is the model's
(:mod:`megarm.model.step`); checkpoints are :mod:`megarm.checkpoint`'s; evaluation
is :mod:`megarm.rewards`'. Nothing outside this package and the ``megarm.train``
command imports it."""

from megarm import platform

# Before megatron-core is first imported: its import-time warnings about absent
# optional kernels are expected on CPU machines.
platform.quiet_expected_warnings()
