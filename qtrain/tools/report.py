"""`qtrain-report`: paper tables from run directories.

    qtrain-report results/                          print the tables (markdown)
    qtrain-report results/ --write RESULTS.md       regenerate RESULTS.md
    qtrain-report results/ --plot docs/curves.png --match ste/mnist   per-epoch curves
    qtrain-report results/ --plot c.png --match cifar10_resnet20 --exclude instability
    qtrain-report --collect outputs/repro --into results/ste_mnist   copy the small files of
                                                    finished runs (result.json, metrics.jsonl,
                                                    overrides.yaml) into the repository

Runs of one experiment file are grouped over seeds (mean ± std, n). Runs that did not finish
or used data.limit_* are listed apart and never mixed into a reproduction row. Every experiment
file with a paper number gets a row; rows without runs say "not run" and why. A run started from
another run's checkpoint (init=<run>/checkpoints/last.pt) is its own row, "(from <that run>)", and
so is a run with other settings than its experiment file's ("with optim.lr=0.01"). An experiment
whose published result is a trend (paper.per_epoch: true, [STE] §4.2) also gets a per-epoch table
whose epoch 0 is the last epoch of the run it started from.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from qtrain.errors import EXIT_BAD_INPUT, QtrainError
from qtrain.keys import CONFIG_DIR, SAME_RESULT_KEYS, VOLATILE, short_name

EXPERIMENTS = CONFIG_DIR / "experiment"


# ---------------------------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------------------------


def read_runs(paths: list[Path]) -> list[dict]:
    """Every run directory below ``paths``: finished ones from result.json, others from metrics.jsonl."""
    runs = []
    for base in paths:
        for metrics in sorted(Path(base).glob("**/metrics.jsonl")):
            d = metrics.parent
            rows = [_json(metrics, x) for x in metrics.read_text().splitlines() if x.strip()]
            result = _json(d / "result.json", (d / "result.json").read_text()) if (d / "result.json").exists() \
                else None
            overrides = d / ".hydra" / "overrides.yaml"
            overrides = overrides if overrides.exists() else d / "overrides.yaml"
            runs.append({"dir": d, "rows": rows, "result": result,
                         "overrides": yaml.safe_load(overrides.read_text()) if overrides.exists() else None})
    return runs


def _json(path: Path, text: str):
    try:
        return json.loads(text)
    except ValueError as e:
        raise QtrainError(f"{path} is not valid JSON ({e}). qtrain writes it atomically, so the file was damaged "
                          "or edited afterwards: restore it (git checkout, or the run's own folder) or remove that "
                          "run folder from the report's input.") from None


def override_of(run: dict, key: str) -> str | None:
    """The value of ``key=`` among the run's command-line overrides (what a run still going has to go by)."""
    given = [o.split("=", 1)[1] for o in run["overrides"] or [] if o.startswith(f"{key}=")]
    return given[-1] if given else None


#: overrides that keep a run in its experiment's row: the row's own keys (seeds are averaged; the schedule
#: scale and the run it started from get their own table and row) and the run-time keys that qtrain.run.resume
#: leaves out of a run's fingerprint (its VOLATILE; a test keeps the two in step). Any other override
#: (optim.lr=0.01) makes the run a variant with a row of its own, never a second seed of the cell.
SAME_CELL_KEYS = {"experiment", "seed", "schedule_scale", "init", "pretrain.schedule_scale", "pretrain.seed",
                  *VOLATILE, *SAME_RESULT_KEYS}


def variant_of(run: dict) -> str:
    """The overrides that make a run differ from its experiment file ('optim.lr=0.01'); '' for none."""
    changed = [o.lstrip("+") for o in run["overrides"] or []
               if o.lstrip("+~").split("=", 1)[0] not in SAME_CELL_KEYS and not o.startswith("hydra.")]
    return " ".join(sorted(changed))


def experiment_of(run: dict) -> str | None:
    if run["result"]:
        return (run["result"].get("choices") or {}).get("experiment")
    return override_of(run, "experiment")


def is_reproduction(run: dict) -> bool:
    r = run["result"]
    return bool(r) and r.get("status") == "complete" and not r.get("data_limited")


def paper_experiments() -> dict[str, dict]:
    """experiment id -> its paper block, from the repository's experiment files."""
    out = {}
    for f in sorted(EXPERIMENTS.glob("**/*.yaml")):
        cfg = yaml.safe_load(f.read_text()) or {}
        if cfg.get("paper"):
            out[str(f.relative_to(EXPERIMENTS).with_suffix(""))] = {**cfg["paper"], "_data": _data_of(cfg),
                                                                    "_epochs": cfg.get("epochs")}
    return out


def _data_of(cfg: dict) -> str:
    for d in cfg.get("defaults", []):
        if isinstance(d, dict) and "override /data" in d:
            return d["override /data"]
    return "?"


def not_run_reason(data: str, epochs=None) -> str:
    if data == "imagenet":
        return "not run: needs ImageNet"
    if data.startswith("cifar") and (epochs or 0) >= 100:
        return f"not run: needs a GPU ({epochs}-epoch schedule)"
    return "not run yet"


def run_label(run: dict) -> str:
    """The run's command-line overrides (what a user recognises), else its folder name."""
    overrides = [o for o in (run["overrides"] or []) if not o.startswith(("out_dir=", "progress=", "hydra."))]
    return " ".join(overrides) if overrides else run["dir"].name


def seed_of(run: dict) -> str:
    """The run's seed: from result.json, else its overrides, else its folder name (s<seed>_<time>)."""
    seed = ((run["result"] or {}).get("config") or {}).get("seed")
    if seed is None:
        named = re.match(r"s(\d+)_", run["dir"].name)
        given = override_of(run, "seed")
        seed = given if given is not None else (named.group(1) if named else "?")
    return str(seed)


def init_checkpoint(run: dict) -> str | None:
    """The checkpoint a run started from (init=<path>): from result.json, else (a run still going) its
    overrides; None for init=float or no init."""
    init = (run["result"].get("config") or {}).get("init") if run["result"] else override_of(run, "init")
    return None if init in (None, "float") else str(init)


def source_run(run: dict, runs: list[dict]) -> dict | None:
    """The run this one started from (init=<a run>/checkpoints/last.pt): found among ``runs`` by its
    folder (runs/<name>/<seed_time>), so results copied elsewhere (results/) still match."""
    init = init_checkpoint(run)
    if init is None:
        return None
    want = Path(init).parent.parent
    for other in runs:
        if other["dir"].parts[-2:] == want.parts[-2:]:
            return other
    return None


def source_label(run: dict, runs: list[dict]) -> str | None:
    """'cifar10_resnet20_a4_clipped_relu' for a run started from that cell's run; the init path if
    that run is not among ``runs``; None for a run that did not start from another run."""
    init = init_checkpoint(run)
    if init is None:
        return None
    src = source_run(run, runs)
    if src is None:
        return init
    return (experiment_of(src) or src["dir"].name).split("/")[-1]


def source_origin(run: dict, runs: list[dict]) -> str:
    """How the cell a run started from was trained, where that is not the paper's setting: ', from cells at 1/10
    of the schedule (full-recipe float start)'. Runs from the same cell name but differently trained cells (part 8's
    and part 10's a4 clipped_relu) are thus never averaged as seeds. '' for a run that started from no run, from one
    not among ``runs`` or not finished, or from a cell at the paper's schedule from its own float start."""
    src = source_run(run, runs)
    if src is None or not src["result"]:
        return ""
    scale, fscale = scale_of(src["result"]), float_scale_of(src, runs)
    other_start = fscale is not None and fscale != scale
    if scale == 1 and not other_start:
        return ""
    text = ", from cells" + (f" at {scale_text(scale)} of the schedule" if scale != 1 else "")
    if other_start:
        text += " (full-recipe float start)" if fscale == 1 else f" ({scale_text(fscale)}-recipe float start)"
    return text


def cell_name(exp: str, src: str | None, variant: str) -> str:
    """How tables and legends name a row: 'ste/x', 'ste/x (from <start>)', 'bcgd/y with optim.lr=0.01'."""
    return exp + (f" (from {src})" if src else "") + (f" with {variant}" if variant else "")


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def mean_std(values: list[float], digits: int = 2) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (n=1)"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f} (n={len(values)})"


def fmt(v, spec=".2f"):
    return "—" if v is None else format(v, spec)


def loss_fmt(v) -> str:
    """Losses as the paper prints them: 0.19, 2.6e-2."""
    if v is None:
        return "—"
    v = float(v)
    return f"{v:.2f}" if v >= 0.1 else f"{v:.1e}".replace("e-0", "e-")


def duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def scale_of(result: dict) -> float:
    return float(result.get("schedule_scale") or 1)


def scale_text(scale: float) -> str:
    """0.1 -> '1/10'; 0.25 -> '1/4'; 2 -> '2x'."""
    if scale < 1 and abs(1 / scale - round(1 / scale)) < 1e-9:
        return f"1/{round(1 / scale)}"
    return f"{scale:g}x"


def epochs_text(result: dict) -> str:
    """'200', or '20 (of 200)' for a run at schedule_scale 0.1."""
    if scale_of(result) == 1:
        return str(result["epochs"])
    return f"{result['epochs']} (of {result.get('unscaled_epochs', '?')}, scale {result['schedule_scale']:g})"


def float_start_name(float_scale: float) -> str:
    """'a full-recipe' or 'a 1/10-recipe', as in '... from a full-recipe float start'."""
    return "a full-recipe" if float_scale == 1 else f"a {scale_text(float_scale)}-recipe"


def table_name(paper_table: str, scale: float, float_scale: float | None = None) -> str:
    """The table of a cell run at ``scale`` of its schedule, from a float start at ``float_scale``
    (None: no float start, or one at the cell's own scale, as every run before pretrain.schedule_scale)."""
    if float_scale is not None and float_scale != scale:
        start = float_start_name(float_scale)
        quantized = ("the quantized phase at the paper's schedule" if scale == 1 else
                     f"the quantized phase at {scale_text(scale)} of the paper's schedule (not a full reproduction)")
        return f"{paper_table}, from {start} float start: {quantized}"
    if scale == 1:
        return paper_table
    return f"{paper_table}: ours at {scale_text(scale)} of the paper's schedule (not a full reproduction)"


def float_start_of(run: dict, runs: list[dict]) -> dict | None:
    """What a run started with ``init=float`` started from: result.json's ``float_start``; for a run
    from before qtrain wrote it, the float run found among ``runs`` by its folder (float/<name>), else
    just its scale (until pretrain.schedule_scale existed, the float model got the run's own). None
    for a run that did not start from the float model."""
    r = run["result"]
    if not r or (r.get("config") or {}).get("init") != "float":
        return None
    if r.get("float_start"):
        return r["float_start"]
    want = Path(str(r.get("init"))).parent.parent
    for other in runs:
        if other["result"] and other["dir"].parts[-2:] == want.parts[-2:]:
            f = other["result"]
            return {"run_dir": str(other["dir"]), "epochs": f.get("epochs"), "schedule_scale": scale_of(f),
                    "unscaled_epochs": f.get("unscaled_epochs"), "final_test_acc": f.get("final_test_acc"),
                    "best_test_acc": f.get("best_test_acc")}
    return {"schedule_scale": scale_of(r)}


def float_scale_of(run: dict, runs: list[dict]) -> float | None:
    start = float_start_of(run, runs)
    return None if start is None else float(start.get("schedule_scale") or 1)


def float_start_text(starts: list[dict | None]) -> str:
    """The float starts of a row's runs: 'full recipe, 200 epochs: 91.52' or '1/10 (20 of 200 epochs):
    84.42, 85.24' (final test accuracy of each distinct start: one per seed where each seed has its own)."""
    by_schedule: dict[str, list[str]] = {}
    for start in starts:
        if start is None:
            by_schedule.setdefault("—", [])
            continue
        scale = float(start.get("schedule_scale") or 1)
        epochs = start.get("epochs", "?")
        schedule = (f"full recipe, {epochs} epochs" if scale == 1 else
                    f"{scale_text(scale)} ({epochs} of {start.get('unscaled_epochs', '?')} epochs)")
        accs = by_schedule.setdefault(schedule, [])
        acc = start.get("final_test_acc")
        if acc is not None and fmt(acc) not in accs:
            accs.append(fmt(acc))
    return "; ".join(k + (f": {', '.join(v)}" if v else "") for k, v in by_schedule.items())


def table_rows(runs: list[dict], papers: dict[str, dict]) -> dict[str, list[str]]:
    """table name -> markdown rows. Runs at another ``schedule_scale`` get their own table, named so."""
    # (experiment, scale, float start's scale, starting run or "", variant) -> results; seeds are averaged
    groups = defaultdict(list)
    for run in runs:
        if is_reproduction(run) and experiment_of(run):
            fscale = float_scale_of(run, runs)
            key = (experiment_of(run), scale_of(run["result"]), None if fscale == scale_of(run["result"]) else fscale,
                   source_origin(run, runs), source_label(run, runs) or "", variant_of(run))
            groups[key].append(dict(run["result"], _float_start=float_start_of(run, runs)))
    tables = defaultdict(list)
    for exp, paper in papers.items():
        ref = paper.get("acc")
        ref_text = fmt(ref) if ref is not None else (f"band {paper['sanity_band']:.2f}" if paper.get("sanity_band")
                                                      else "—")
        loss_text = loss_fmt(paper.get("loss"))
        keys = sorted({k[1:] for k in groups if k[0] == exp}, key=lambda k: (-k[0], -(k[1] or 0), *k[2:]))
        if not any(scale == 1 and fscale is None and not variant for scale, fscale, _, _, variant in keys):
            keys.insert(0, (1.0, None, "", "", ""))  # the full-schedule row of the cell as configured says why it was not run
        for scale, fscale, origin, src, variant in keys:
            results = groups.get((exp, scale, fscale, origin, src, variant), [])
            name = cell_name(exp, src, variant)
            table = table_name(paper["table"], scale, fscale) + origin
            tables[table].append(_row(name, ref, ref_text, loss_text, paper, results))
    return tables


def _row(exp, ref, ref_text, loss_text, paper, results) -> str:
    """One markdown row: the paper's number beside ours (mean over seeds), or why it was not run."""
    if not results:
        return f"| {exp} | {ref_text} | {loss_text} | {not_run_reason(paper['_data'], paper.get('_epochs'))} | | | | | | | | |"
    final = [r["final_test_acc"] for r in results]
    best = [r["best_test_acc"] for r in results]
    losses = [r["final_train_loss"] for r in results]
    target = ref if ref is not None else paper.get("sanity_band")
    diff = f"{statistics.mean(final) - target:+.2f}" if target is not None else "—"
    devices = sorted({r["device"] for r in results})
    wall = statistics.mean(r["wall_time_s"] for r in results)
    speed = statistics.mean(r["train_images_per_s"] for r in results)
    epochs = epochs_text(results[0])
    starts = float_start_text([r.get("_float_start") for r in results])
    return (f"| {exp} | {ref_text} | {loss_text} | {mean_std(final)} | {mean_std(best)} | {diff} | "
            f"{loss_fmt(statistics.mean(losses))} | {epochs} | {starts} | {'; '.join(devices)} | {duration(wall)} | "
            f"{speed:,.0f} |")


HEADER = ("| experiment | paper acc | paper train loss | ours: final acc | ours: best-epoch acc | Δ final − paper | "
          "ours: final train loss | epochs | float start (init=float): schedule, final acc | device | "
          "wall time (mean) | train img/s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def float_rows(runs: list[dict]) -> list[str]:
    rows = []
    for run in runs:
        r = run["result"]
        if is_reproduction(run) and not experiment_of(run) and is_float_start(run):
            c = r["config"]
            # the cells of one model may start from different float models (BinaryRelax/BCGD: affine BN)
            model = short_name(c["model"]) + (" (affine BN)" if c["model"].get("norm_affine") else "")
            rows.append(f"| {short_name(c['data'])} | {model} | "
                        f"{c['seed']} | {fmt(r['final_test_acc'])} | {fmt(r['best_test_acc'])} | "
                        f"{r['final_train_loss']:.2e} | {epochs_text(r)} | {r['device']} | {duration(r['wall_time_s'])} |")
    return sorted(rows)


def is_float_start(run: dict) -> bool:
    c = run["result"]["config"]
    return c.get("abits") is None and c.get("wbits") is None


def runs_rows(runs: list[dict]) -> list[str]:
    """Complete runs that are not paper cells nor float starting points: a user's own runs."""
    rows = []
    for run in runs:
        r = run["result"]
        if is_reproduction(run) and not experiment_of(run) and not is_float_start(run):
            rows.append(f"| {run_label(run)} | {fmt(r['final_test_acc'])} | {fmt(r['best_test_acc'])} | "
                        f"{r.get('best_epoch', '—')} | {loss_fmt(r.get('final_train_loss'))} | {epochs_text(r)} | "
                        f"{r['device']} | {duration(r['wall_time_s'])} |")
    return rows


def other_rows(runs: list[dict]) -> list[str]:
    rows = []
    for run in runs:
        if is_reproduction(run):
            continue
        r = run["result"]
        status = "incomplete" if not r else ("data-limited" if r.get("data_limited") else r.get("status", "?"))
        last = run["rows"][-1] if run["rows"] else {}
        rows.append(f"| {run_label(run)} | {experiment_of(run) or '—'} | {status} | {last.get('epoch', 0)} | "
                    f"{fmt(last.get('test/acc'))} |")
    return rows


def start_row(run: dict, runs: list[dict]) -> dict | None:
    """Epoch 0 of a run started from another run: that run's last epoch (its weights are this run's start)."""
    src = source_run(run, runs)
    return dict(src["rows"][-1], epoch=0) if src and src["rows"] else None


def per_epoch_tables(runs: list[dict], papers: dict[str, dict]) -> list[str]:
    """For experiments whose published result is a trend (paper.per_epoch: true, e.g. [STE] §4.2): every
    finished run's training loss and test accuracy per epoch, from the run it started from (epoch 0) on."""
    out = []
    for run in sorted(runs, key=lambda r: (experiment_of(r) or "", source_origin(r, runs), source_label(r, runs) or "")):
        exp = experiment_of(run)
        if not (is_reproduction(run) and exp in papers and papers[exp].get("per_epoch")):
            continue
        src = source_label(run, runs)
        start = start_row(run, runs)
        title = f"### {papers[exp]['table']}{source_origin(run, runs)}, per epoch: {cell_name(exp, src, variant_of(run))}"
        out += [title + f" (seed {seed_of(run)})", "",
                "| epoch | train loss | test acc | test loss | lr |", "|---|---|---|---|---|"]
        rows = ([start] if start else []) + run["rows"]
        for x in rows:
            label = f"0 (start: {src}'s last epoch)" if x is start else str(x["epoch"])
            out.append(f"| {label} | {fmt(x.get('train/loss'), '.4f')} | {fmt(x.get('test/acc'))} | "
                       f"{fmt(x.get('test/loss'), '.4f')} | {fmt(x.get('lr') if x is not start else None, 'g')} |")
        if start:
            last = run["rows"][-1]
            out.append("")
            out.append(f"From the start to epoch {last['epoch']}: training loss {start['train/loss']:.4f} → "
                       f"{last['train/loss']:.4f} ({last['train/loss'] - start['train/loss']:+.4f}), test accuracy "
                       f"{start['test/acc']:.2f} → {last['test/acc']:.2f} ({last['test/acc'] - start['test/acc']:+.2f}"
                       " points). The start's training loss is the mean over its own last epoch.")
        out.append("")
    return out


def schedule_gap_tables(runs: list[dict], papers: dict[str, dict]) -> list[str]:
    """Where a cell ran from the same float start at several quantized schedules (part 10: 1/10 and 1/4 from
    the full-recipe float ResNet-20), how its gap to the paper closes with the schedule: one table per paper
    table and float start, a row per cell, a column per schedule (final test accuracy, mean over seeds)."""
    cells = defaultdict(lambda: defaultdict(list))  # (paper table, float scale, experiment) -> scale -> accs
    for run in runs:
        exp, fscale = experiment_of(run), float_scale_of(run, runs)
        if (is_reproduction(run) and exp in papers and fscale is not None and not variant_of(run)
                and not source_label(run, runs)):
            cells[(papers[exp]["table"], fscale, exp)][scale_of(run["result"])].append(run["result"]["final_test_acc"])
    tables = defaultdict(list)
    for (table, fscale, exp), by_scale in sorted(cells.items()):
        if len(by_scale) > 1:
            tables[(table, fscale)].append((exp, by_scale))
    out = []
    for (table, fscale), rows in tables.items():
        scales = sorted({s for _, by_scale in rows for s in by_scale})
        out += [f"### {table}, from {float_start_name(fscale)} float start: the gap to the paper against the quantized schedule", "",
                "| experiment | paper acc | " + " | ".join(f"ours at {scale_text(s)}: final acc, Δ paper"
                                                         for s in scales) + " |",
                "|---|---|" + "---|" * len(scales)]
        for exp, by_scale in rows:
            ref = papers[exp].get("acc")
            cols = [_gap_cell(by_scale.get(s), ref) for s in scales]
            out.append(f"| {exp} | {fmt(ref) if ref is not None else '—'} | " + " | ".join(cols) + " |")
        out.append("")
    return out


def _gap_cell(accs: list[float] | None, ref: float | None) -> str:
    """'89.25 ± 0.35 (n=2), -1.99': the final accuracies at one schedule and their mean's gap to the paper."""
    if not accs:
        return "—"
    return mean_std(accs) if ref is None else f"{mean_std(accs)}, {statistics.mean(accs) - ref:+.2f}"


def report(paths: list[Path]) -> str:
    runs = read_runs(paths)
    papers = paper_experiments()
    tables = table_rows(runs, papers)
    out = []
    for name in sorted(tables):
        out += [f"### {name}", "", HEADER, *tables[name], ""]
    out += schedule_gap_tables(runs, papers)
    out += per_epoch_tables(runs, papers)
    floats = float_rows(runs)
    if floats:
        out += ["### Float starting points (init=float)", "",
                "| data | model | seed | final acc | best acc | final train loss | epochs | device | wall time |",
                "|---|---|---|---|---|---|---|---|---|", *floats, ""]
    own = runs_rows(runs)
    if own:
        out += ["### Runs", "",
                "| run (overrides) | final acc | best acc | best epoch | final train loss | epochs | device | wall time |",
                "|---|---|---|---|---|---|---|---|", *sorted(own), ""]
    others = other_rows(runs)
    if others:
        out += ["### Runs that are not reproductions (incomplete or data-limited)", "",
                "| run | experiment | status | epochs done | last test acc |", "|---|---|---|---|---|", *others, ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Plot and collect
# ---------------------------------------------------------------------------------------------


def curve_name(run: dict, runs: list[dict]) -> str:
    """A plot's name for a run: its table row's (one colour per row), and "from a full-recipe float start"
    where its float start had another schedule than the cell's own, as the tables keep those apart (a run
    still training goes by its overrides)."""
    name = cell_name(experiment_of(run) or run["dir"].name, source_label(run, runs), variant_of(run))
    if run["result"]:
        fscale, scale = float_scale_of(run, runs), scale_of(run["result"])
    else:
        given, own = override_of(run, "pretrain.schedule_scale"), override_of(run, "schedule_scale")
        fscale, scale = (None if given is None else float(given)), float(own or 1)
    if fscale is None or fscale == scale:
        return name
    return f"{name} (from {float_start_name(fscale)} float start)"


def plot(paths: list[Path], out: Path, match: str | None, exclude: str | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    every = read_runs(paths)
    runs = [r for r in every if r["rows"] and (match is None or match in (experiment_of(r) or ""))
            and not (exclude and exclude in (experiment_of(r) or ""))
            and not (r["result"] or {}).get("data_limited")]  # a data-limited check is not a curve of the recipe
    if not runs:  # no empty figure (e.g. the §4.2 plot before its runs exist)
        return 0
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.2))

    def name_of(run):  # one colour per row of the tables (the method folder says br/, bcgd/, ste/)
        return curve_name(run, every)

    names = sorted({name_of(r) for r in runs})
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    seeds = sorted({seed_of(r) for r in runs})
    for run in sorted(runs, key=lambda r: (name_of(r), seed_of(r))):
        seed = seed_of(run)
        n = len(run["rows"])
        # no result.json: still training, or stopped to be resumed (the report cannot tell which)
        done = "" if run["result"] else f" (unfinished: {n} epoch{'' if n == 1 else 's'})"
        style = dict(color=colors[name_of(run)], ls=["-", "--", ":", "-."][seeds.index(seed) % 4], lw=1,
                     marker=".", ms=3, label=f"{name_of(run)} s{seed}{done}")  # (a marker: one epoch shows)
        start = start_row(run, every)
        rows = ([start] if start else []) + run["rows"]  # a run started from another one: its start is epoch 0
        epochs = [x["epoch"] for x in rows]
        ax_acc.plot(epochs, [x.get("test/acc") for x in rows], **style)
        ax_loss.plot(epochs, [x.get("train/loss") for x in rows], **style)
    ax_acc.set_ylabel("test accuracy (%)")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_yscale("log")
    for ax in (ax_acc, ax_loss):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = ax_acc.get_legend_handles_labels()
    ncol = 3 if max(map(len, labels)) <= 60 else 1  # long names ("… (from <start run>)") need the full width
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.04 * (1 + (len(runs) + ncol - 1) // ncol), 1, 1))  # room for the legend below
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return len(runs)


def collect(src: Path, dest: Path) -> int:
    """Copy the small files of every finished run below ``src`` into ``dest`` (same sub-paths)."""
    n = 0
    for result in sorted(src.glob("**/result.json")):
        d = result.parent
        target = dest / d.relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in ("result.json", "metrics.jsonl"):
            shutil.copy2(d / name, target / name)
        if (d / ".hydra" / "overrides.yaml").exists():
            shutil.copy2(d / ".hydra" / "overrides.yaml", target / "overrides.yaml")
        n += 1
    return n


def write_results_md(path: Path, tables: str, paths: list[Path]) -> None:
    """RESULTS.md = the generated tables between markers, hand-written text around them kept."""
    begin, end = "<!-- qtrain-report:begin -->", "<!-- qtrain-report:end -->"
    block = f"{begin}\n<!-- generated by: qtrain-report {' '.join(map(str, paths))} --write {path} -->\n\n{tables}\n{end}"
    text = path.read_text() if path.exists() else f"# Results\n\n{begin}\n{end}\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1] if end in rest else ""
    path.write_text(head + block + tail)


def _print_to_pipe(text: str) -> None:
    """Print; when the reader has gone away (`qtrain-report | head`), stop quietly as other Unix tools do.
    stdout is pointed at /dev/null so that Python's flush at exit does not raise again (Python docs, signal)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="qtrain-report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", type=Path, help="folders holding run directories (default: results/)")
    p.add_argument("--write", type=Path, help="regenerate this markdown file's generated block (e.g. RESULTS.md)")
    p.add_argument("--plot", type=Path, help="write a PNG of test accuracy and training loss per epoch")
    p.add_argument("--match", help="with --plot: only runs whose experiment contains this text")
    p.add_argument("--exclude", help="with --plot: leave out runs whose experiment contains this text")
    p.add_argument("--collect", type=Path, help="copy finished runs' small files from this folder ...")
    p.add_argument("--into", type=Path, help="... into this one")
    args = p.parse_args(argv)
    if args.collect:
        if not args.into:
            p.error("--collect needs --into")
        print(f"collected {collect(args.collect, args.into)} runs into {args.into}")
        return
    paths = args.paths or [Path("results")]
    missing = [str(x) for x in paths if not x.exists()]
    if missing:
        print(f"qtrain-report: error: no such folder: {', '.join(missing)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    try:
        tables = report(paths)
    except QtrainError as e:
        print(f"qtrain-report: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    if args.write:
        write_results_md(args.write, tables, paths)
        print(f"wrote {args.write}")
    else:
        _print_to_pipe(tables)
    if args.plot:
        n = plot(paths, args.plot, args.match, args.exclude)
        print(f"plotted {n} runs into {args.plot}" if n else f"no runs to plot: {args.plot} not written", file=sys.stderr)


if __name__ == "__main__":
    main()
