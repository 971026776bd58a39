"""vulnsteer: measure and steer vulnerability detection in language models."""

import os

# Busy-waiting OpenMP threads make CPU timings on small machines swing threefold; torch reads this at import,
# so it is set here, before any submodule imports torch. A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
