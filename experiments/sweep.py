"""Run a grid of one config's overrides (e.g. target sparsity x bit range x seed), one
``experiments.run`` process per point, then the Pareto table and chart over every point.

    python -m experiments.sweep --config experiments/configs/geta_mnist_cnn.py \\
        --grid method.sparsity=0.4,0.5,0.6 --grid "method.bits=(2.,3.);(2.,4.)" \\
        --grid seed=0 --root runs/geta_sweep --jobs 2 [--with runs/ptq_s0 ...]

``--grid key=v1,v2`` (commas inside brackets do not split; ``;`` may separate instead) adds one
axis; the workdir of a point is ``<root>/<key>=<value>_...``. A point whose ``results.json``
exists is skipped, and an interrupted point resumes from its checkpoint, so re-running the
command finishes a sweep.
"""

from __future__ import annotations

import argparse
import itertools
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from experiments import pareto


def _split(values: str) -> list[str]:
    """Split on ``;`` if present, else on the commas outside brackets: ``(2.,3.),(2.,4.)``."""
    if ";" in values:
        return values.split(";")
    return pareto.split_top_level(values)


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``["a.b=1,2", "c=(1.,2.);(2.,4.)"]`` → ``[("a.b", ["1", "2"]), ("c", [...])]``."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key or not values:
            raise ValueError(f"--grid {spec!r}: use key=v1,v2 (or key=v1;v2).")
        vals = [v.strip() for v in _split(values) if v.strip()]
        axes.append((key.strip(), vals))
    return axes


def points(axes: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """Every combination of the axes' values, as ``{key: value}``."""
    keys = [k for k, _ in axes]
    combos = itertools.product(*(v for _, v in axes))
    return [dict(zip(keys, combo, strict=True)) for combo in combos]


def workdir_name(point: dict[str, str]) -> str:
    """Filesystem-safe name of a grid point, e.g. ``method.sparsity=0.4_seed=0``."""
    raw = "_".join(f"{k}={v}" for k, v in point.items())
    return re.sub(r"[^A-Za-z0-9_.=+-]", "", raw.replace(",", "+"))


def run_point(config: str, point: dict[str, str], workdir: Path, extra: list[str]) -> int:
    """Run one point (skipped when its results exist); returns the process's exit code."""
    if (workdir / "results.json").exists():
        return 0
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "experiments.run", f"--config={config}",
           f"--workdir={workdir}", "--config.progress=False", *extra]
    cmd += [f"--config.{k}={v}" for k, v in point.items()]
    with open(workdir / "run.log", "w") as log:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def main(argv: list[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--grid", action="append", default=[], help="key=v1,v2 (repeatable)")
    ap.add_argument("--root", default="runs/sweep")
    ap.add_argument("--jobs", type=int, default=1, help="points run at once")
    ap.add_argument("--with", dest="others", nargs="*", default=[],
                    help="other finished workdirs to put in the table and chart")
    ap.add_argument("--set", dest="extra", action="append", default=[],
                    help="a fixed override for every point, e.g. --set num_steps=500")
    a = ap.parse_args(argv)
    axes = parse_grid(a.grid)
    if not axes:
        raise SystemExit("give at least one --grid key=v1,v2")
    pts = points(axes)
    root = Path(a.root)
    dirs = [root / workdir_name(p) for p in pts]
    extra = [f"--config.{e}" for e in a.extra]
    with ThreadPoolExecutor(max(1, a.jobs)) as pool, tqdm(total=len(pts), desc="sweep") as bar:
        futures = [pool.submit(run_point, a.config, p, d, extra) for p, d in zip(pts, dirs,
                                                                                 strict=True)]
        codes = []
        for f in futures:
            codes.append(f.result())
            bar.update(1)
    failed = [str(d) for d, c in zip(dirs, codes, strict=True) if c != 0]
    if failed:
        print(f"{len(failed)} point(s) failed; see run.log in: {', '.join(failed)}")
    done = [str(d) for d in dirs if (d / "results.json").exists()] + list(a.others)
    if done:
        runs = pareto.load(done)
        print(pareto.table(runs))
        print(f"chart: {pareto.plot(runs, root / 'pareto.png')}")
    return dirs


if __name__ == "__main__":
    main()
