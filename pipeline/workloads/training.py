"""The one training loop of the trained reference workloads (MNIST CNN, digit detector).

Seeded and single-threaded so that the weights are bit-for-bit the same on every machine, saved
atomically, and cached by the caller's recipe hash: a workload trains once, then loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


def fit(model: Any, n: int, loss_of: Callable[[Any, Any], Any], *, seed: int, epochs: int, batch: int,
        optimizer: Any, max_lr: float, log: Callable[[str], None] | None = None) -> Any:
    """One-cycle training over ``n`` samples; ``loss_of(indices, generator)`` returns a batch's loss."""
    import torch

    sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=epochs * ((n + batch - 1) // batch))
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            loss = loss_of(idx, gen)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if log:
            log(f"epoch {epoch + 1}/{epochs} loss {total / n:.4f}")
    return model.eval()


def train_and_save(out: Path, seed: int, train: Callable[[], Any]) -> Path:
    """Run ``train()`` seeded, on one thread, with deterministic kernels; save its state dict atomically."""
    import torch

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-for-bit repeatable regardless of the machine's core count
    try:
        model = train()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(out)  # atomic: a crash mid-save never leaves a half file that looks done
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    return out


def load_or_train(path: Path, build: Callable[[], Any], train: Callable[[Path], Path]) -> Any:
    """The cached weights in ``build()``'s architecture, eval mode (training first when missing)."""
    import torch

    if not path.is_file():
        train(path)
    model = build()
    model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    return model.eval()
