"""The styleblend services."""

import os

# OpenMP's threads spin for a while after each parallel region, on the cores NNPACK's own threads
# need next (Winograd convolutions, services.reconstruction.winograd): while they spin, Winograd
# gains nothing (docs/perf.md has the measurement). OpenMP reads this once, when torch loads
# it, so it is set here, before any service imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
