"""Collect ``results.json`` files into a markdown table (mean and spread over seeds per method)
and a Pareto chart of test accuracy vs relative BOPs (log x).

    python -m experiments.pareto runs/geta_s0 runs/geta_s1 ... --out runs/pareto.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from experiments.run import LEGACY_FRACTIONS
from jaxjpq.methods.geta import DEFAULT_FRACTIONS


def _bits(b: Any) -> str:
    """``[2.0, 4.0]`` → ``"[2, 4]"``, ``4.0`` → ``"4"``."""
    if isinstance(b, list | tuple):
        return "[" + ", ".join(f"{float(x):g}" for x in b) + "]"
    return f"{float(b):g}"


def load(workdirs: list[str]) -> dict[str, list[dict[str, Any]]]:
    """``{method label: [results, ...]}`` from workdirs (their ``results.json``) or ``.json``
    files; the label is the method name plus its sparsity or BOPs target and bits."""
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    records = []
    for w in workdirs:
        path = Path(w) if str(w).endswith(".json") else Path(w) / "results.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run the experiment first.")
        records.append(json.loads(path.read_text()))
    # a record without the dense parameter count takes it from a run of the same model
    dense = {json.dumps(r["config"].get("model"), sort_keys=True): r["compression"]["dense_params"]
             for r in records if "dense_params" in (r.get("compression") or {})}
    for r in records:
        comp = r.get("compression") or {}
        key = json.dumps(r["config"].get("model"), sort_keys=True)
        if comp and "dense_params" not in comp and key in dense:
            comp["dense_params"] = dense[key]
    for r in records:
        m = r["config"].get("method", {"name": "fp32"})
        label = m["name"]
        if label == "fp32":  # a compression config run with method.name=fp32: no budget applies
            runs[label].append(r)
            continue
        if m.get("power_of_two"):
            label += " pow2"
        cost = f", cost power {m['cost_power']:g}" if m.get("cost_power") else ""
        if m.get("allocation", "global") != "global":
            cost += f", {m['allocation']}"
        # a GETA record without a schedule field ran LEGACY_FRACTIONS
        schedule = tuple(m.get("schedule", LEGACY_FRACTIONS))
        if m["name"] == "geta" and schedule != DEFAULT_FRACTIONS:
            cost += f", schedule {schedule}"
        if m.get("cooldown_clips"):
            cost += ", clips trained in cool-down"
        if "quantize_at" in m:  # the staged baseline's schedule, as fractions of the steps
            cost += f", prune at {m['prune_at']:g}, quantize at {m['quantize_at']:g}"
        if m["name"] in ("fit", "uniform_magnitude"):  # a search to a size or BOPs budget
            budget = (f"size {100 * m['size']:g} %" if m.get("size")
                      else f"BOPs {100 * m['bops']:g} %")
            how = (f"bits {_bits(m['bits'])}" if m["name"] == "fit"
                   else f"{m['uniform_bits']:g} bits, magnitude")
            if m.get("criterion", "fit") != "fit":
                how += f", {m['criterion']} criterion"
            if m["name"] == "fit":
                how += f", {m.get('fisher_samples')} Fisher samples"
                if m.get("fisher_reduce", "diag") != "diag":
                    how += f", {m['fisher_reduce']} Fisher"
            label += f" ({budget}, {how}, {m.get('pretrain_steps')} + fine-tune)"
        elif m["name"] in ("ajpq", "ajpq_random"):
            budget = (f"size {100 * m['size']:g} %" if m.get("size")
                      else f"BOPs {100 * m['bops']:g} %")
            n = m["episodes"] * m.get("agent", {}).get("population", 8)
            level = (", channel level" if m.get("hierarchy") else
                     ", per-channel" if m.get("per_channel") else "")
            label += f" ({budget}, bits {_bits(m['bits'])}, {n} candidates{level})"
        elif "target_bops" in m:
            knobs = f", margin {m['margin']:g}" if m.get("margin", 0.1) != 0.1 else ""
            if m.get("gate_at", "weights") != "weights":
                knobs += f", gate at {m['gate_at']}"
            label += (f" (target {100 * m['target_bops']:g} % BOPs, bits {_bits(m['bits'])}"
                      f"{knobs})")
        elif "sparsity" in m:
            label += f" (sparsity {m['sparsity']:g}, bits {_bits(m['bits'])}{cost})"
        runs[label].append(r)
    return dict(runs)


def layers(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per layer of a compressed run, from its ``cost.report`` table: ``{layer: {"w_bits",
    "a_bits", "kept" (fraction of the layer's weights kept: channels x nonzeros), "bops"
    (share of the model's BOPs, %)}}``; empty for fp32."""
    text = (result.get("compression") or {}).get("report", "")
    out: dict[str, dict[str, float]] = {}

    def frac(cell: str) -> float:
        if cell == "-":
            return 1.0
        kept, total = cell.split("/")
        return int(kept) / int(total)

    for line in text.splitlines():
        cells = line.split()  # layer, in kept, out kept, w bits, a bits, MACs, [nnz %,] BOPs %
        if len(cells) not in (7, 8) or cells[0] == "layer":
            continue
        try:
            w, a, share = float(cells[3]), float(cells[4]), float(cells[-1])
            nnz = float(cells[6]) if len(cells) == 8 else 100.0
            kept = frac(cells[1]) * frac(cells[2]) * nnz / 100
        except ValueError:
            continue
        out[cells[0]] = {"w_bits": w, "a_bits": a, "kept": kept, "bops": share}
    return out


def _stat(values: list[float], scale: float = 1.0) -> str:
    lo, hi = min(values) * scale, max(values) * scale
    mean = sum(values) / len(values) * scale
    return f"{mean:.2f} ({lo:.2f}-{hi:.2f})" if len(values) > 1 else f"{mean:.2f}"


def relative_size(result: dict[str, Any]) -> float:
    """Bytes of the saved export directory / fp32 bytes of the dense model (1 for fp32)."""
    comp = result.get("compression") or {}
    exp = comp.get("export")
    if not exp:
        return 1.0
    if "relative_disk" in exp:
        return float(exp["relative_disk"])
    if "dense_params" not in comp:
        return float("nan")
    return float(exp["disk_bytes"]) / (4.0 * comp["dense_params"])


def _fp32_bytes(comp: dict[str, Any]) -> float:
    exp = comp.get("export") or {}
    return float(exp.get("fp32_bytes") or 4.0 * comp.get("dense_params", float("nan")))


def _deployed_share(result: dict[str, Any], key: str) -> float:
    """``compression.deployed[key]`` bytes (a number, or a dict with its ``total``) over the fp32
    model's: 1 for fp32, NaN where the run did not record it."""
    comp = result.get("compression") or {}
    if not comp:
        return 1.0
    b = (comp.get("deployed") or {}).get(key)
    if b is None:
        return float("nan")
    return float(b["total"] if isinstance(b, dict) else b) / _fp32_bytes(comp)


def relative_active(result: dict[str, Any]) -> float:
    """Kept weights at their bits (``cost.active_bytes``) / fp32 bytes."""
    return _deployed_share(result, "active_bytes")


def relative_resident(result: dict[str, Any]) -> float:
    """The deployed model's bytes in device memory / fp32 bytes."""
    return _deployed_share(result, "resident_bytes")


def split_top_level(text: str) -> list[str]:
    """``text`` split at the commas outside brackets: ``"(2.,3.),(2.,4.)"`` → two parts."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def short_label(label: str) -> str:
    """``"fit (BOPs 0.5 %, bits [2.0, 8.0], 16384 Fisher samples, ...)"`` → the method and its
    first two settings, ``"fit (BOPs 0.5 %, bits [2.0, 8.0])"``."""
    name, sep, rest = label.partition(" (")
    if not sep:
        return label
    items = [i.strip() for i in split_top_level(rest[:-1])]  # the settings
    # and those that tell variants of one method apart
    keep = items[:2] + [i for i in items[2:] if i.startswith((
        "quantize at", "channel level", "per-channel", "per_group", "margin", "gate at"))]
    return f"{name} ({', '.join(keep)})"


def table(runs: dict[str, list[dict[str, Any]]], compact: bool = False) -> str:
    """Markdown rows: mean (min-max over seeds) of test accuracy, relative BOPs and relative
    size (the export directory's bytes over the fp32 model's), in %; ``compact``: test accuracy
    (mean, min-max), the means of the accuracy at the start of training (a search method's:
    the searched model's, before fine-tuning), relative BOPs and the active, resident and disk
    bytes over the fp32 model's, under :func:`short_label` labels."""
    def mean(values, scale=100.0):
        values = [v for v in values if v == v]  # NaN: not recorded
        return f"{scale * sum(values) / len(values):.2f}" if values else "-"

    if compact:
        rows = ["| Method | Seeds | Test acc. % | Start acc. % | Rel. BOPs % | Bytes % of fp32: "
                "active / resident / disk |", "|---|---|---|---|---|---|"]
        for label, rs in runs.items():
            comp = [r.get("compression") or {} for r in rs]
            start = [c.get("start_test_accuracy", float("nan")) for c in comp]
            rows.append(
                f"| {short_label(label)} | {len(rs)} | "
                f"{_stat([r['test_accuracy'] for r in rs], 100)} | "
                f"{mean(start) if comp[0] else '-'} | "
                f"{mean([c.get('rel_bops', 1.0) for c in comp])} | "
                f"{mean(map(relative_active, rs))} / {mean(map(relative_resident, rs))} / "
                f"{mean(map(relative_size, rs))} |")
        return "\n".join(rows)
    rows = [
        "| Method | Seeds | Test acc. % | Rel. BOPs % | Sparsity | Mean bits (w) | Restored % "
        "| Export / fp32 bytes % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, rs in runs.items():
        comp = [r.get("compression") or {} for r in rs]
        acc = [r["test_accuracy"] for r in rs]
        bops = [c.get("rel_bops", 1.0) for c in comp]
        restored = [c["export"]["restored_test_accuracy"] for c in comp if "export" in c]
        size = [x for r in rs if (r.get("compression") or {}).get("export")
                and (x := relative_size(r)) == x]  # NaN: the fp32 size is not known
        rows.append(
            f"| {label} | {len(rs)} | {_stat(acc, 100)} | {_stat(bops, 100)} | "
            f"{_stat([c.get('sparsity', 0.0) for c in comp])} | "
            f"{_stat([c.get('mean_bits', 32.0) for c in comp])} | "
            f"{_stat(restored, 100) if restored else '-'} | "
            f"{_stat(size, 100) if size else '-'} |"
        )
    return "\n".join(rows)


def plot(runs: dict[str, list[dict[str, Any]]], out: Path, size: bool = False) -> Path:
    """Scatter of every run (test accuracy vs relative BOPs, log x; with ``size`` a second
    panel vs relative size), one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, ScalarFormatter

    xs_of = {"relative BOPs (% of fp32, log scale)":
             lambda r: (r.get("compression") or {}).get("rel_bops", 1.0)}
    if size:
        xs_of["export bytes (% of fp32, log scale)"] = relative_size
    fig, axes = plt.subplots(1, len(xs_of), figsize=(6 + 5 * len(xs_of), 4.5), squeeze=False)
    markers = {"fp32": "*", "geta": "o", "djpq": "s", "prune_then_quantize": "^", "fit": "D",
               "uniform_magnitude": "v", "ajpq": "P", "ajpq_random": "X"}
    for ax, (xlabel, x_of) in zip(axes[0], xs_of.items(), strict=True):
        for label, rs in runs.items():
            xs = [100 * x_of(r) for r in rs]
            ys = [100 * r["test_accuracy"] for r in rs]
            ax.scatter(xs, ys, label=label, alpha=0.8, marker=markers.get(label.split()[0], "o"))
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))  # 0.2, 0.5, 2, 5, ...
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("workdirs", nargs="+")
    ap.add_argument("--out", default="runs/pareto.png")
    a = ap.parse_args(argv)
    runs = load(a.workdirs)
    print(table(runs))
    print(f"chart: {plot(runs, Path(a.out))}")


if __name__ == "__main__":
    main()
