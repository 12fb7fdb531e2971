"""u2pl-scale: U2PL semi-supervised semantic segmentation as a distributed trainer."""
import os as _os

# CPU runs: OpenMP workers that sleep instead of spinning (spinning threads of several ranks or loader processes
# on few cores made steps several times slower here), and transparent huge pages for torch's large CPU buffers.
# Read by the OpenMP runtime and torch when they load, so set before torch is imported; users may override.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
