"""Data-parallel runs: :mod:`.ranks` (which process is which, the collectives the loop uses),
:mod:`.sync_batchnorm` (batch norm over the global batch on the CPU) and :mod:`.launcher` (how the
workers start; it is given the job it runs)."""
