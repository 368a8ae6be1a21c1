"""The styleblend services."""

import os

# OpenMP's threads spin for a while after each parallel region, on the cores NNPACK's own threads
# need next (Winograd convolutions, services.reconstruction.winograd): with spinning, a 256 px
# iteration gained nothing from Winograd; asleep, 1.36× (docs/perf.md). OpenMP reads this once,
# when torch loads it, so it is set here, before any service imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
