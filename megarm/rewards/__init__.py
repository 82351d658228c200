"""The reward library: text in, rewards out, from a megarm checkpoint or an HF export.

- :mod:`~megarm.rewards.encoding`: records, chat messages or chat-formatted text ->
  token rows exactly as training saw them (preprocessing's own record encoder and
  truncation rule); every row ends with the template's response end, the reward
  convention recorded with the model, whatever form the client sent.
- :mod:`~megarm.rewards.batches`: rows -> micro-batches by padded tokens, longest
  first, through the model's step (:func:`megarm.model.step.run_schedule`, forward
  only) at any TP/PP.
- :mod:`~megarm.rewards.backends`: :class:`~megarm.rewards.backends.MegatronScorer`
  (a megarm checkpoint; rank 0 drives, the other ranks follow) and
  :class:`~megarm.rewards.backends.HFScorer` (an HF export in transformers), and
  :func:`~megarm.rewards.backends.open_scorer`, which picks one from what the
  directory holds.
- :mod:`~megarm.rewards.benchmarks`: benchmark formats and their metrics;
  :mod:`~megarm.rewards.stats`: reward statistics; :mod:`~megarm.rewards.critique`:
  critique generation for critique reward models.

What a run records beside its weights (convention, statistics) is read through
:mod:`megarm.checkpoint.metadata`. No command-line parsing here: the commands
(``megarm.score``, ``serve``, ``evaluate``, ``reward_stats``, ``generate``) do it.
"""

from megarm.errors import ScoringError

__all__ = ["ScoringError"]
