"""Every method on one model at one budget and the same seeds, then one Markdown table and one
Pareto chart (test accuracy vs relative BOPs and vs relative size).

    python -m experiments.compare --model mnist_cnn --seeds 0,1,2 --bops 0.005 \\
        --root runs/compare_mnist_cnn --jobs 2
    python -m experiments.compare --size 0.04 --root runs/compare_mnist_cnn   # same root
    python -m experiments.compare report runs/compare_mnist_cnn [--out chart.png]
    python -m experiments.compare pairs runs/compare_mnist_cnn djpq_bops0.005:prune_then_quantize

A method runs when ``experiments/configs/<prefix>_<model>.py`` exists (``<model>.py`` for
fp32). A relative-BOPs budget (``--bops``) is the target of DJPQ, FITCompress, its uniform-bits
+ magnitude baseline and AJPQ; a size budget (``--size``: the export directory's bytes over the
fp32 model's) that of FITCompress, the baseline and AJPQ. The other methods run at their
config's knobs (GETA and prune-then-quantize: a channel sparsity and a bit range; DJPQ under
``--size``: its BOPs target), changed with ``--set geta:method.sparsity=0.6``; the table shows
where they land. Budgeted points are named ``<method>_<budget>_s<seed>``, so several budgets
share one root, and the search methods of a seed share one fp32 pre-training,
``<root>/pretrain_s<seed>``.

``--protocol P,C[,LR]`` puts every row on one training protocol: a shared fp32 pre-training of
``P`` steps per seed (``<root>/pretrain_s<seed>``), then ``C`` steps of compression and
fine-tuning at peak learning rate ``LR`` (default 1e-3, warm-up ``C/20``) for every method; the
fp32 row trains ``P + C`` steps. A method may run twice under different knobs as ``NAME@TAG``
(``--methods prune_then_quantize,prune_then_quantize@late --set
prune_then_quantize@late:method.quantize_at=0.7``); ``--set all:field=value`` sets every point.

    python -m experiments.compare --protocol 1000,1000 --bops 0.003 --seeds 0,1,2,3,4 \
        --set all:data.name=fashion_mnist --root runs/fm_protocol --jobs 2

Resumable: a point whose ``results.json`` exists is skipped, an interrupted one resumes from its
checkpoint. ``--reuse DIR`` adopts a result JSON from ``DIR`` whose recorded config equals the
point's (fields that do not change the numbers aside) instead of running it again.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ml_collections
from tqdm import tqdm

from experiments import pareto
from experiments.run import (
    FREE_FIELDS,
    LEGACY_FRACTIONS,
    flat_config,
    pretrain_recipe,
    recorded_config,
)
from jaxjpq.methods import registry

CONFIGS = Path(__file__).resolve().parent / "configs"


def _overrides(entry: registry.MethodEntry) -> dict[str, dict[str, Any]]:
    """``{budget kind: {config field: value}}`` a budget point sets ("B" = the budget); a search
    method's other budget kind is switched off."""
    out = {}
    for kind, fld in entry.budget_fields.items():
        out[kind] = {f"method.{fld}": "B"}
        out[kind].update({f"method.{f}": 0.0 for k, f in entry.budget_fields.items()
                          if k != kind and entry.family == "search"})
    return out


# method -> config-file prefix ("" = the model's fp32 config), {budget kind: overrides}; built
# from the method registry: the default rows
METHODS: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "fp32": ("", {}),
    **{name: (e.config_prefix, _overrides(e)) for name, e in registry.METHODS.items()
       if name != "ajpq_random"},
}
# ... and random search, run here only when named (``--methods ...,ajpq_random``)
KNOWN = {**METHODS, "ajpq_random": (registry.METHODS["ajpq_random"].config_prefix,
                                    _overrides(registry.METHODS["ajpq_random"]))}
# methods that start from a shared fp32 model
_PRETRAINED = tuple(n for n, e in registry.METHODS.items() if e.family == "search")


def base(method: str) -> str:
    """``prune_then_quantize@late`` → ``prune_then_quantize``."""
    return method.partition("@")[0]
# Fields that do not change a result's numbers: a reused result may differ in them (where the
# data and the pre-training are read from, beyond what a resume may change).
_FREE = (*FREE_FIELDS, "method.pretrain_dir", "data.cache_dir", "data.data_dir")


def config_file(method: str, model: str) -> Path:
    """``experiments/configs/<prefix><model>.py`` of ``method``."""
    return CONFIGS / f"{KNOWN[base(method)][0]}{model}.py"


def load_config(path: Path) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"_cmp_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def protocol_values(method: str, protocol: tuple[int, int, float]) -> dict[str, Any]:
    """The fields ``--protocol P,C,LR`` sets on a point of ``method`` (see the module doc)."""
    pre, steps, lr = protocol
    if base(method) == "fp32":
        return {"num_epochs": 0, "num_steps": pre + steps}
    return {"num_epochs": 0, "num_steps": steps, "method.pretrain_steps": pre,
            "optim.learning_rate": lr, "optim.warmup_steps": max(1, steps // 20)}


def shares_pretraining(method: str, protocol) -> bool:
    """Whether the points of ``method`` start from the seed's shared fp32 pre-training."""
    return base(method) in _PRETRAINED or (protocol is not None and base(method) != "fp32")


def overrides(method: str, seed: int, budget: tuple[str, float], root: Path,
              extra: dict[str, dict[str, Any]], protocol=None) -> dict[str, Any]:
    """The ``--config.<field>`` values of one point, as Python values."""
    out: dict[str, Any] = {"seed": seed}
    kind, value = budget
    for k, v in KNOWN[base(method)][1].get(kind, {}).items():
        out[k] = value if v == "B" else v
    if protocol is not None:
        out.update(protocol_values(method, protocol))
    if shares_pretraining(method, protocol):
        out["method.pretrain_dir"] = str((root / f"pretrain_s{seed}").absolute())
    out.update(extra.get("all", {}))
    out.update(extra.get(method, {}))
    return out


def apply(cfg: ml_collections.ConfigDict, values: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with ``values`` set (dotted keys), as the dict ``results.json`` records."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise ValueError(f"--set {key}: the config has no field {leaf!r}.")
        node[leaf] = value
    return json.loads(json.dumps(recorded_config(cfg)))


def same_numbers(recorded: dict[str, Any], config: dict[str, Any], set_keys=()) -> bool:
    """Whether a result recorded with ``recorded`` has the numbers ``config`` gives: equal
    fields (the :data:`_FREE` ones aside); a field the record lacks (one added to the configs
    after it ran) counts as its default unless ``set_keys`` sets it."""
    fa, fb = flat_config(recorded), flat_config(config)
    keys = {k for k in set(fa) | set(fb) if k not in _FREE}
    return all(fa.get(k) == fb.get(k) for k in keys
               if k in fa or any(k == s or k.startswith(s + ".") for s in set_keys))


def find_reusable(config: dict[str, Any], dirs: list[Path], set_keys=()) -> Path | None:
    """The first result JSON under ``dirs`` recorded with the numbers of ``config``."""
    for d in dirs:
        for f in sorted(d.rglob("*.json")):
            try:
                r = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if not (isinstance(r, dict) and "test_accuracy" in r and "config" in r):
                continue
            recorded = json.loads(json.dumps(r["config"]))
            method = recorded.get("method", {})
            if method.get("name") == "geta" and "schedule" not in method:
                method["schedule"] = list(LEGACY_FRACTIONS)  # what a record without it ran
            if same_numbers(recorded, config, set_keys):
                return f
    return None


def _cli_value(v: Any) -> str:
    return f"({','.join(map(str, v))})" if isinstance(v, tuple | list) else str(v)


def run_point(config: Path, values: dict[str, Any], workdir: Path) -> int:
    """One ``experiments.run`` process (its log in ``<workdir>/run.log``); its exit code."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "experiments.run", f"--config={config}",
           f"--workdir={workdir}", "--config.progress=False",
           *(f"--config.{k}={_cli_value(v)}" for k, v in values.items())]
    with open(workdir / "run.log", "w") as log:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def parse_set(specs: list[str]) -> dict[str, dict[str, Any]]:
    """``["geta:method.sparsity=0.6"]`` → ``{"geta": {"method.sparsity": 0.6}}``."""
    import ast

    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        method, sep, rest = spec.partition(":")
        key, eq, value = rest.partition("=")
        if not sep or not eq or (base(method) not in KNOWN and method != "all"):
            raise SystemExit(f"--set {spec!r}: use METHOD:field=value, METHOD one of "
                             f"{', '.join(KNOWN)} (or NAME@TAG of one), or all.")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        out.setdefault(method, {})[key] = parsed
    return out


def point_name(method: str, seed: int, budget: tuple[str, float]) -> str:
    """``geta_s0``; ``fit_size0.04_s0`` for a method the budget applies to."""
    kind, value = budget
    tag = f"_{kind}{value:g}" if kind in KNOWN[base(method)][1] else ""
    return f"{method.replace('@', '-')}{tag}_s{seed}"


def plan(model: str, methods: list[str], seeds: list[int], budget: tuple[str, float],
         root: Path, extra: dict[str, dict[str, Any]], protocol=None) -> list[dict[str, Any]]:
    """The points to run, pre-training users of a seed after its first one."""
    missing = [m for m in methods if not config_file(m, model).is_file()]
    methods = [m for m in methods if m not in missing]
    if not methods:
        raise SystemExit(f"no config for model {model!r} in {CONFIGS}.")
    for m in missing:
        print(f"{m}: no {config_file(m, model).name}, skipped")
    files = {m: config_file(m, model) for m in methods}
    configs = {m: load_config(f) for m, f in files.items()}
    pts = []
    for seed in seeds:
        for m in methods:
            values = overrides(m, seed, budget, root, extra, protocol)
            name = configs[m].get("method", {}).get("name", "fp32")
            if base(m) != name:  # a method run from another's config (ajpq_random)
                values["method.name"] = base(m)
            pts.append({"method": m, "seed": seed, "file": files[m], "values": values,
                        "shared": shares_pretraining(m, protocol),
                        "workdir": root / point_name(m, seed, budget),
                        "config": apply(configs[m], values)})
    check_shared_pretraining(pts)
    return pts


def check_shared_pretraining(pts: list[dict[str, Any]]) -> None:
    """Raise (before any training) where points that share a seed's pre-training directory
    would pre-train with different recipes (``run.pretrain_recipe``)."""
    groups: dict[str, dict[str, list[str]]] = {}
    for p in pts:
        if not p["shared"]:
            continue
        m = p["config"]["method"]
        steps = m.get("pretrain_steps") or f"{m.get('pretrain_epochs', 0)} epochs"
        recipe = json.dumps(pretrain_recipe(p["config"], steps), sort_keys=True)
        groups.setdefault(m["pretrain_dir"], {}).setdefault(recipe, []).append(p["method"])
    for directory, recipes in groups.items():
        if len(recipes) > 1:
            parsed = [json.loads(r) for r in recipes]
            fields = sorted(k for k in parsed[0] if len({json.dumps(r[k], sort_keys=True)
                                                         for r in parsed}) > 1)
            who = " vs ".join(",".join(ms) for ms in recipes.values())
            raise SystemExit(f"{directory}: {who} would pre-train with other {fields}; give "
                             "them one recipe (--set METHOD:method.pretrain_optim.FIELD=...).")


def execute(pts: list[dict[str, Any]], reuse: list[Path], jobs: int) -> list[str]:
    """Run (or adopt, or skip) every point; returns the workdirs that failed."""
    todo = []
    for p in pts:
        result = p["workdir"] / "results.json"
        if result.exists():
            continue
        src = find_reusable(p["config"], reuse, tuple(p["values"]))
        if src is not None:
            p["workdir"].mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, result)
            (p["workdir"] / "reused_from.txt").write_text(f"{src}\n")
            continue
        todo.append(p)
    # A seed's pre-training is written by its first search point; the others wait for it.
    first: dict[int, threading.Event] = {}
    waits: list[threading.Event | None] = []
    for p in todo:
        if not p["shared"]:
            waits.append(None)
        elif p["seed"] not in first:
            first[p["seed"]] = threading.Event()
            waits.append(None)
        else:
            waits.append(first[p["seed"]])
    order = sorted(range(len(todo)), key=lambda i: waits[i] is not None)

    def one(i: int) -> int:
        p = todo[i]
        if waits[i] is not None:
            waits[i].wait()
        try:
            return run_point(p["file"], p["values"], p["workdir"])
        finally:
            ev = first.get(p["seed"])
            if p["shared"] and waits[i] is None and ev is not None:
                ev.set()

    failed = []
    with ThreadPoolExecutor(max(1, jobs)) as pool, \
            tqdm(total=len(todo), desc="compare") as bar:
        futures = {pool.submit(one, i): i for i in order}
        for f, i in futures.items():
            if f.result() != 0:
                failed.append(str(todo[i]["workdir"]))
            bar.update(1)
    return failed


def _order(label: str) -> tuple:
    """Rows by method (the order of :data:`METHODS`), then by label."""
    name = base(label.split(" ", 1)[0])
    return (list(KNOWN).index(name) if name in KNOWN else len(KNOWN), label)


def results_in(directory: Path) -> list[str]:
    """Every ``results.json`` under ``directory`` (the pre-training folders hold none)."""
    return sorted(str(f) for f in directory.rglob("results.json"))


def report(directory: Path, out: Path | None = None) -> tuple[str, Path]:
    """Markdown table (written to ``<directory>/table.md``, a three-column one to
    ``table_compact.md``) and chart of a results directory."""
    files = results_in(directory)
    if not files:
        raise SystemExit(f"{directory}: no results.json below it.")
    runs = dict(sorted(pareto.load(files).items(), key=lambda kv: _order(kv[0])))
    text = pareto.table(runs)
    (directory / "table.md").write_text(text + "\n")
    (directory / "table_compact.md").write_text(pareto.table(runs, compact=True) + "\n")
    chart = pareto.plot(runs, out or directory / "pareto.png", size=True)
    return text, chart


def by_seed(directory: Path, name: str) -> dict[int, dict[str, Any]]:
    """``{seed: results.json}`` of the points ``<directory>/<name>_s<seed>``."""
    out = {}
    for f in directory.glob(f"{name}_s*/results.json"):
        seed = f.parent.name[len(name) + 2:]
        if seed.isdigit():
            out[int(seed)] = json.loads(f.read_text())
    return out


def _field(result: dict[str, Any], dotted: str) -> float:
    for key in dotted.split("."):
        result = result[key]
    return float(result)


def paired(directory: Path, a: str, b: str, metric: str = "test_accuracy",
           scale: float = 100.0) -> dict[str, Any]:
    """``metric`` (a results.json key, dotted for a nested one, e.g.
    ``compression.best_reward``; test accuracy in points by default) of the points
    ``<a>_s<seed>`` against ``<b>_s<seed>`` (point names without the seed, e.g.
    ``djpq_bops0.01`` and ``prune_then_quantize``) over the seeds both have: per-seed
    differences (``scale`` x the metric), their mean, whether ``a``'s worst seed is above
    ``b``'s best, and the two-sided paired t-test's p-value (NaN below 2 seeds)."""
    from scipy import stats

    ra, rb = by_seed(directory, a), by_seed(directory, b)
    seeds = sorted(set(ra) & set(rb))
    if not seeds:
        raise SystemExit(f"{directory}: no seed has both {a}_s<seed> and {b}_s<seed>.")
    da = [scale * _field(ra[s], metric) for s in seeds]
    db = [scale * _field(rb[s], metric) for s in seeds]
    diff = [x - y for x, y in zip(da, db, strict=True)]
    p = float(stats.ttest_rel(da, db).pvalue) if len(seeds) > 1 and len(set(diff)) > 1 \
        else float("nan")
    return {"seeds": seeds, "a": da, "b": db, "diff": diff, "mean_diff": sum(diff) / len(diff),
            "worst_a_above_best_b": min(da) > max(db), "p": p}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["pairs"]:
        ap = argparse.ArgumentParser(prog="experiments.compare pairs",
                                     description="Paired per-seed comparisons of points.")
        ap.add_argument("directory")
        ap.add_argument("pairs", nargs="+", help="A:B point names without _s<seed>")
        a = ap.parse_args(argv[1:])
        for spec in a.pairs:
            x, sep, y = spec.partition(":")
            if not sep:
                raise SystemExit(f"{spec!r}: give A:B.")
            r = paired(Path(a.directory), x, y)
            print(f"{x} - {y}: seeds {r['seeds']}, differences "
                  f"{', '.join(f'{d:+.2f}' for d in r['diff'])} (mean {r['mean_diff']:+.2f} "
                  f"points), worst {x} above best {y}: {r['worst_a_above_best_b']}, "
                  f"paired t-test p = {r['p']:.3g}")
        return
    if argv[:1] == ["report"]:
        ap = argparse.ArgumentParser(prog="experiments.compare report",
                                     description="Table and chart of a results directory.")
        ap.add_argument("directory")
        ap.add_argument("--out", default=None, help="chart path (default <directory>/pareto.png)")
        a = ap.parse_args(argv[1:])
        text, chart = report(Path(a.directory), Path(a.out) if a.out else None)
        print(text)
        print(f"chart: {chart}")
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--model", default="mnist_cnn", help="the configs' model name")
    ap.add_argument("--seeds", default="0,1,2")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--bops", type=float, default=None,
                       help="relative BOPs budget (fraction of fp32; default 0.005)")
    group.add_argument("--size", type=float, default=None,
                       help="size budget: export bytes / fp32 bytes (fraction)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated; NAME@TAG runs NAME again under its own --set")
    ap.add_argument("--protocol", default=None,
                    help="P,C[,LR]: shared fp32 pre-training of P steps, then C steps at LR")
    ap.add_argument("--root", default=None, help="results directory (default runs/compare_<model>)")
    ap.add_argument("--jobs", type=int, default=1, help="points run at once")
    ap.add_argument("--reuse", nargs="*", default=[], help="directories of result JSONs to adopt")
    ap.add_argument("--set", dest="extra", action="append", default=[],
                    help="METHOD:field=value for every point of METHOD (repeatable)")
    a = ap.parse_args(argv)
    budget = ("size", a.size) if a.size is not None else ("bops", a.bops or 0.005)
    if not 0.0 < budget[1] <= 1.0:
        raise SystemExit(f"--{budget[0]} {budget[1]}: give a fraction of fp32's in (0, 1].")
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in methods if base(m) not in KNOWN]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {', '.join(KNOWN)}.")
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    root = Path(a.root or f"runs/compare_{a.model}")
    root.mkdir(parents=True, exist_ok=True)
    protocol = None
    if a.protocol:
        parts = a.protocol.split(",")
        try:
            protocol = (int(parts[0]), int(parts[1]), float(parts[2]) if len(parts) > 2 else 1e-3)
        except (ValueError, IndexError):
            raise SystemExit(f"--protocol {a.protocol!r}: give P,C or P,C,LR.") from None
        if len(parts) > 3 or protocol[0] <= 0 or protocol[1] <= 0 or protocol[2] <= 0:
            raise SystemExit(f"--protocol {a.protocol!r}: P, C and LR must be > 0.")
    pts = plan(a.model, methods, seeds, budget, root, parse_set(a.extra), protocol)
    failed = execute(pts, [Path(d) for d in a.reuse], a.jobs)
    if failed:
        print(f"{len(failed)} point(s) failed; see run.log in: {', '.join(failed)}")
    text, chart = report(root)
    print(text)
    print(f"chart: {chart}")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
