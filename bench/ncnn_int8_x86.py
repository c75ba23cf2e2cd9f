"""What makes ncnn int8 fast or slow on this CPU: one calibration, several ways to write it.

Builds a workload's ncnn fp32 and int8 (``int8_depthwise: int8``, so every conv has a range)
with a temporary ``local``-based target and a private stage cache, then writes int8 variants from
the same thresholds with ``pipeline.backends.ncnn.int8`` and runs them with the device agent's
ncnn runner (batch 1, 2 threads), all in interleaved rounds beside fp32:

* ``int8 all``: every conv int8, no requantize (the writer before issue 15's change);
* ``+ requantize``: the same with int8 conv -> int8 conv requantize fusion;
* ``+ depthwise float``: requantize, every depthwise conv float (``int8_depthwise: float``);
* ``+ x86 rule``: requantize, depthwise float except 3x3 stride 2 (``auto`` on x86_64);
* ``pointwise float``: requantize, the 1x1 convs float (what int8 buys there).

The variants carry the fp32 biases (the build's bias correction is not redone here), so their
top-1 / agreement / SQNR on the evaluation set compare the variants with each other, not with the
shipped artifact. Speed-up: the median over rounds of the per-round fp32 p50 / variant p50, with
the range over rounds. Usage::

    .venv/bin/python bench/ncnn_int8_x86.py --workload mobilenet-v2 [--rounds 15 --per-round 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibration.metrics import sqnr_db  # noqa: E402
from interleave import interleaved  # noqa: E402

SPECS = {"efficientnet-lite0": ROOT / "examples" / "efficientnet_lite0.yaml",
         "mobilenet-v2": ROOT / "examples" / "mobilenet_v2.yaml", "mnist": ROOT / "examples" / "mnist.yaml"}


def build(workload: str, work: Path, backend: str = "ncnn",
          options: dict[str, Any] | None = None) -> tuple[dict[str, Any], Any]:
    """The fp32 and int8 artifacts of ``backend`` (by precision) and the spec (a ``local``-based
    target, a private stage cache under ``work``)."""
    from pipeline.build import build as run_build
    from pipeline.cache import Cache
    from pipeline.spec import BuildSpec, load_spec, load_target

    spec = load_spec(SPECS[workload])
    target = load_target("local").model_copy(deep=True)
    opts = {"int8_depthwise": "int8"} if options is None and backend == "ncnn" else (options or {})
    target.builds = [BuildSpec(backend=backend, precisions=["fp32", "int8"], options=opts)]
    result = run_build(spec, target, work / "build", cache=Cache(work / "stages"), log=lambda s: None)
    return {a.precision: a for a in result.artifacts}, spec


def variants(arts: dict[str, Any], work: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Variant name -> (folder, runner config), fp32 first."""
    from pipeline.backends.ncnn import int8, paramfile
    from pipeline.backends.ncnn.weights import read_weights

    fp32, q8 = arts["fp32"], arts["int8"]
    model = paramfile.read(fp32.workdir / "model.param")
    weights = read_weights(model, (fp32.workdir / "model.bin").read_bytes())
    thr = {s["bottom"]: s["threshold"] for s in q8.info["calibration"]["notes"]["scales"].values()}
    pointwise = {q.name for q in model.layers if q.type == "Convolution" and q.get_int(1) == 1 and q.get_int(11, 1) == 1}
    recipes = {"int8 all": ("int8", False, set()), "+ requantize": ("int8", True, set()),
               "+ depthwise float": ("float", True, set()), "+ x86 rule": ("x86", True, set()),
               "pointwise float": ("int8", True, pointwise)}
    out = {"fp32": (fp32.workdir, fp32.runner_config)}
    for name, (policy, fuse, keep) in recipes.items():
        layers = int8.plan(model, frozenset(keep), depthwise=policy).quantize
        param, blob, _ = int8.write(model, weights, layers, thr, requantize=fuse)
        folder = work / "variants" / name.replace(" ", "_").replace("+", "plus")
        folder.mkdir(parents=True, exist_ok=True)
        param.write(folder / "model.param")
        (folder / "model.bin").write_bytes(blob)
        out[name] = (folder, q8.runner_config)
    return out


def timed(runners: dict[str, Any], x: np.ndarray, rounds: int, per_round: int) -> dict[str, list[list[float]]]:
    """ms per run, per variant and round; every round visits every variant (rotated order)."""
    return interleaved({n: (lambda r=r: r.run(x)) for n, r in runners.items()}, rounds, per_round)


def main() -> int:
    from pipeline.agent.runners import load_runner_module
    from pipeline.stages.inputs import load_samples

    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", default="mobilenet-v2", choices=sorted(SPECS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--per-round", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgeship-ncnn-x86-"))
    arts, spec = build(args.workload, work)
    ev = load_samples(spec, "evaluation")
    x, y = np.asarray(ev.single("ncnn int8 x86"), np.float32), np.asarray(ev.y).reshape(-1)
    runners = {}
    for name, (folder, config) in variants(arts, work).items():
        runners[name] = load_runner_module("ncnn").Runner(folder, config, 2)
        runners[name].activate()
    outs = {n: next(iter(r.run(x).values())).reshape(len(x), -1) for n, r in runners.items()}
    times = timed(runners, x[:1], args.rounds, args.per_round)
    ref = outs["fp32"]
    print(f"{args.workload}: {len(x)} evaluation samples; p50 of {args.rounds} rounds x {args.per_round} runs")
    print("| variant | top-1 % | agree % | SQNR dB | p50 ms [p25, p75] (n) | speed-up vs fp32 [range] |")
    print("|---|---|---|---|---|---|")
    for n, o in outs.items():
        flat = np.concatenate(times[n])
        ratios = [np.median(f) / np.median(v) for f, v in zip(times["fp32"], times[n])]
        print(f"| {n} | {100 * (o.argmax(1) == y).mean():.2f} | {100 * (o.argmax(1) == ref.argmax(1)).mean():.2f} | "
              f"{sqnr_db(ref, o):.1f} | {np.median(flat):.3f} [{np.percentile(flat, 25):.3f}, "
              f"{np.percentile(flat, 75):.3f}] ({flat.size}) | {np.median(ratios):.2f}x "
              f"[{min(ratios):.2f}, {max(ratios):.2f}] |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
