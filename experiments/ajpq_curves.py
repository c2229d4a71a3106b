"""AJPQ's agent against random search: best reward versus the number of evaluated policies, per
seed, from the ``history`` each search records in ``results.json``.

    python -m experiments.ajpq_curves runs/fm_vit ajpq_size0.1 ajpq_random_size0.1 \\
        --out experiments/results/fashion_mnist/vit_ajpq/curves.png

Prints a Markdown table (mean and min-max over seeds of the best reward after a share of the
evaluations) and the paired comparisons at the end of the search: best reward, its held-out
accuracy before fine-tuning, and test accuracy after it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from experiments.compare import by_seed, paired


def curves(directory: Path, name: str) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """``(evaluations [E], {seed: best reward after each episode [E]})`` of the points
    ``<directory>/<name>_s<seed>``; every seed must have searched the same episodes."""
    runs = by_seed(directory, name)
    if not runs:
        raise SystemExit(f"{directory}: no {name}_s<seed>/results.json.")
    best, evals = {}, None
    for seed, r in sorted(runs.items()):
        comp = r["compression"]
        hist = comp["history"]
        e = np.arange(1, len(hist) + 1) * (comp["evaluations"] // len(hist))
        if evals is not None and not np.array_equal(e, evals):
            raise SystemExit(f"{name}: seed {seed} searched {comp['evaluations']} policies in "
                             f"{len(hist)} episodes, another seed {evals[-1]} in {len(evals)}.")
        evals = e
        best[seed] = np.array([h["best_reward"] for h in hist])
    return evals, best


def table(directory: Path, names: list[str], shares=(0.125, 0.25, 0.5, 0.75, 1.0)) -> str:
    """Markdown: best reward (mean (min-max) over seeds) after each share of the search."""
    data = {n: curves(directory, n) for n in names}
    evals = next(iter(data.values()))[0]
    rows = ["| Policies evaluated | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|"]
    for share in shares:
        i = max(0, int(round(share * len(evals))) - 1)
        cells = []
        for n in names:
            v = np.array([b[i] for b in data[n][1].values()])
            cells.append(f"{v.mean():.3f} ({v.min():.3f}-{v.max():.3f})")
        rows.append(f"| {evals[i]} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(directory: Path, names: list[str], out: Path) -> Path:
    """Mean best reward over seeds (line) and its min-max band against policies evaluated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n in names:
        evals, best = curves(directory, n)
        m = np.stack(list(best.values()))
        ax.plot(evals, m.mean(0), label=f"{n} ({len(best)} seeds)")
        ax.fill_between(evals, m.min(0), m.max(0), alpha=0.2)
    ax.set_xlabel("policies evaluated")
    ax.set_ylabel("best reward so far")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def comparisons(directory: Path, a: str, b: str) -> list[str]:
    """The paired comparisons of ``a`` against ``b`` at the end of the search, one line each."""
    out = []
    for label, metric, scale in (("best reward", "compression.best_reward", 1.0),
                                 ("held-out acc. of the best policy (points)",
                                  "compression.searched_accuracy", 100.0),
                                 ("test acc. after fine-tune (points)", "test_accuracy", 100.0)):
        r: dict[str, Any] = paired(directory, a, b, metric, scale)
        out.append(f"{label}: {a} - {b}, seeds {r['seeds']}: "
                   f"{', '.join(f'{d:+.3f}' for d in r['diff'])} (mean {r['mean_diff']:+.3f}), "
                   f"worst above best: {r['worst_a_above_best_b']}, paired t-test p = "
                   f"{r['p']:.3g}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("directory")
    ap.add_argument("agent", help="point name of the agent's runs, without _s<seed>")
    ap.add_argument("random", help="point name of random search's runs, without _s<seed>")
    ap.add_argument("--out", default=None, help="chart path (default <directory>/curves.png)")
    a = ap.parse_args(argv)
    d = Path(a.directory)
    print(table(d, [a.agent, a.random]))
    print("\n".join(comparisons(d, a.agent, a.random)))
    print(f"chart: {plot(d, [a.agent, a.random], Path(a.out or d / 'curves.png'))}")


if __name__ == "__main__":
    main()
