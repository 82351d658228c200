"""megarm: outcome reward models on megatron-core with tensor and pipeline parallelism.

Importing the package is cheap (no torch): the config checker must answer in
well under two seconds.
"""

__version__ = "0.1.0"
