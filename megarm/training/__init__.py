"""Training: the losses (:mod:`~megarm.training.loss`), the loop
(:mod:`~megarm.training.loop`), its data streams (:mod:`~megarm.training.data`),
metrics, and the FLOP and memory estimates. The forward step is the model's
(:mod:`megarm.model.step`); checkpoints are :mod:`megarm.checkpoint`'s; evaluation
is :mod:`megarm.rewards`'. Nothing outside this package and the ``megarm.train``
command imports it."""

# No imports here: the memory and FLOP estimates are read by ``python -m megarm.config``,
# which imports no torch. The modules that import megatron-core import megarm.platform
# first (it quiets megatron-core's import-time warnings about absent kernels).
