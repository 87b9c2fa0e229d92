"""Tables, plots and the report of scripts/long_context.py; ``publish`` copies them into docs/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

BEGIN, END = "<!-- long-context:begin -->", "<!-- long-context:end -->"
PLOTS = ("accuracy", "dispersion")


LABEL_ORDER = ("softmax", "scalable softmax", "1.5-entmax", "scalable 1.5-entmax")


def _groups(results: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """(task, positions, label) -> the runs of its seeds; tasks and schemes in the run's order, mechanisms
    in ``LABEL_ORDER`` (others after them)."""
    tasks = list(dict.fromkeys(r["task"] for r in results))
    positions = list(dict.fromkeys(r["positions"] for r in results))

    def order(r: dict[str, Any]) -> tuple[int, int, int, str, int]:
        label = LABEL_ORDER.index(r["label"]) if r["label"] in LABEL_ORDER else len(LABEL_ORDER)
        return tasks.index(r["task"]), positions.index(r["positions"]), label, r["label"], r["seed"]

    out: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in sorted(results, key=order):
        out.setdefault((r["task"], r["positions"], r["label"]), []).append(r)
    return out


def _values(runs: list[dict[str, Any]], length: str, key: str) -> list[float]:
    return [r["results"][length][key] for r in runs if r["results"][length].get(key) is not None]


def _cell(values: list[float], percent: bool = True, digits: int = 0) -> str:
    if not values:
        return "-"
    scale = 100 if percent else 1
    mean = scale * float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    lo, hi = scale * min(values), scale * max(values)
    return f"{mean:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def tables(run: dict[str, Any]) -> str:
    """The markdown tables of a run: exact match, per-token accuracy and dispersion per length."""
    results = run["results"]
    groups = _groups(results)
    lengths = [str(n) for n in run["config"]["lengths"]]
    lines = []
    tasks = list(dict.fromkeys(r["task"] for r in results))
    for task in tasks:
        for metric, title in (("exact", "exact match, %"), ("token_acc", "per-token accuracy, %")):
            same = all(v["exact"] == v["token_acc"] for r in results if r["task"] == task
                       for v in r["results"].values())
            if metric == "token_acc" and same:
                lines += [f"({task}: per-token accuracy equals exact match, one answer token.)", ""]
                continue
            lines += [f"**{task}**, {title} (mean over seeds, (min-max)); trained at lengths "
                      f"{_train_range(run, task)}", "",
                      "| positions | mechanism | " + " | ".join(lengths) + " |",
                      "|---|---|" + "---|" * len(lengths)]
            for (t, positions, label), runs in groups.items():
                if t != task:
                    continue
                cells = [_cell(_values(runs, n, metric)) for n in lengths]
                lines.append(f"| {positions} | {label} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["**Dispersion**: entropy (nats) of the last layer's attention at the query of the first answer token, "
              "and its support (keys with nonzero weight; float32 underflow counts as zero), mean over heads, "
              "test sequences and seeds", ""]
    for task in tasks:
        lines += [f"*{task}*", "", "| positions | mechanism | " + " | ".join(
            f"{n}: H / support" for n in lengths) + " |", "|---|---|" + "---|" * len(lengths)]
        for (t, positions, label), runs in groups.items():
            if t != task:
                continue
            cells = []
            for n in lengths:
                ent, sup = _values(runs, n, "entropy"), _values(runs, n, "support")
                cells.append(f"{np.mean(ent):.2f} / {np.mean(sup):.0f}" if ent else "-")
            lines.append(f"| {positions} | {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _train_range(run: dict[str, Any], task: str) -> str:
    s = run["settings"][task]
    return f"{s['seq_len'] - s['vary_len']}-{s['seq_len'] + s['vary_len']}"


def findings(run: dict[str, Any]) -> list[str]:
    """Plain statements computed from the numbers: who is best at the longest length, beyond the seeds' spread?"""
    groups = _groups(run["results"])
    lengths = [str(n) for n in run["config"]["lengths"]]
    out = []
    for task in dict.fromkeys(r["task"] for r in run["results"]):
        for positions in dict.fromkeys(r["positions"] for r in run["results"]):
            rows = {label: runs for (t, p, label), runs in groups.items() if t == task and p == positions}
            if not rows:
                continue
            trained = lengths[0]
            fit = [label for label, runs in rows.items() if min(_values(runs, trained, "exact")) >= 0.9]
            longest = {}
            for label, runs in rows.items():
                ok = [n for n in lengths if np.mean(_values(runs, n, "exact")) >= 0.9]
                longest[label] = int(ok[-1]) if ok and ok[0] == trained else None
            last = lengths[-1]
            text = (f"{task}, {positions}: learned at the training length (every seed >= 90% exact) by "
                    f"{', '.join(fit) if fit else 'none'}")
            if not fit:
                out.append(text + "; the longer lengths are not compared (chance-level models).")
                continue
            spans = {label: (min(_values(rows[label], last, "exact")), max(_values(rows[label], last, "exact")))
                     for label in fit}
            best = max(spans, key=lambda lb: np.mean(_values(rows[lb], last, "exact")))
            beaten = [lb for lb in spans if lb != best and spans[lb][1] < spans[best][0]]
            text += ("; longest length with mean exact match >= 90%: "
                     + ", ".join(f"{lb} {longest[lb] or '-'}" for lb in fit)
                     + f". At {last} ({rows[best][0]['results'][last]['n']} test sequences per seed): best mean "
                     f"{best} ({100 * np.mean(_values(rows[best], last, 'exact')):.0f}%)")
            seeds = min(len(rows[lb]) for lb in fit)
            if len(fit) < 2:
                text += "."
            elif seeds < 2:
                text += " (one seed: no spread to compare against)."
            else:
                text += (f", above the whole seed range of {', '.join(beaten)}." if beaten else
                         ", not beyond the seed range of every other mechanism that learned the task.")
            out.append(text)
    return out


def plots(run: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(run["results"])
    lengths = run["config"]["lengths"]
    tasks = list(dict.fromkeys(r["task"] for r in run["results"]))
    positions = list(dict.fromkeys(r["positions"] for r in run["results"]))
    labels = list(dict.fromkeys(label for _, _, label in groups))
    colors = {lb: f"C{i}" for i, lb in enumerate(labels)}
    paths = []

    fig, axes = plt.subplots(len(positions), len(tasks), figsize=(4.2 * len(tasks), 3.2 * len(positions)),
                             squeeze=False, sharex=True, sharey=True)
    for r, pos in enumerate(positions):
        for c, task in enumerate(tasks):
            ax = axes[r][c]
            for lb in labels:
                runs = groups.get((task, pos, lb))
                if not runs:
                    continue
                vals = np.array([[run_["results"][str(n)]["exact"] for n in lengths] for run_ in runs]) * 100
                ax.plot(lengths, vals.mean(0), marker="o", color=colors[lb], label=lb)
                ax.fill_between(lengths, vals.min(0), vals.max(0), color=colors[lb], alpha=0.15)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{task}, {pos}")
            ax.axvline(_train_max(run, task), color="grey", lw=0.8, ls="--")
            if c == 0:
                ax.set_ylabel("exact match, %")
            if r == len(positions) - 1:
                ax.set_xlabel("test length (tokens)")
    paths.append(_finish(fig, axes, "Accuracy vs length (line: mean over seeds, band: min-max; dashed: longest "
                         "training length)", out / "long_context_accuracy.png"))

    combos = [(t, p) for t in tasks for p in positions if any((t, p, lb) in groups for lb in labels)]
    fig, axes = plt.subplots(2, len(combos), figsize=(4.2 * len(combos), 6.4), squeeze=False, sharex=True)
    for c, (task, pos) in enumerate(combos):
        for r, key in enumerate(("entropy", "support")):
            ax = axes[r][c]
            for lb in labels:
                runs = groups.get((task, pos, lb))
                if not runs:
                    continue
                vals = [np.mean(_values(runs, str(n), key)) for n in lengths]
                ax.plot(lengths, vals, marker="o", color=colors[lb], label=lb)
            if key == "entropy":
                ax.plot(lengths, np.log(lengths), color="grey", ls=":", label="log n (uniform)")
                ax.set_ylabel("entropy (nats)")
            else:
                ax.plot(lengths, lengths, color="grey", ls=":", label="n (all keys)")
                ax.set_yscale("log", base=2)
                ax.set_ylabel("support (keys)")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{task}, {pos}: {key}")
            if r == 1:
                ax.set_xlabel("test length (tokens)")
    paths.append(_finish(fig, axes, "Dispersion of the last layer's attention at the answer query",
                         out / "long_context_dispersion.png"))
    return paths


def _finish(fig: Any, axes: Any, title: str, path: Path) -> Path:
    """Legend, title and layout of a figure of plots; written to ``path`` and closed."""
    import matplotlib.pyplot as plt

    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _loads(run: dict[str, Any]) -> str:
    loads = [p["load"][0] for p in run.get("phases", []) if p.get("load")]
    return ", ".join(f"{x:.1f}" for x in loads) or "-"


def _train_max(run: dict[str, Any], task: str) -> int:
    s = run["settings"][task]
    return s["seq_len"] + s["vary_len"]


def summary(run: dict[str, Any]) -> str:
    cfg = run["config"]
    first = next(iter(run["settings"].values()))
    lines = [
        f"`python scripts/long_context.py --size {run['size']}`: {len(run['results'])} models "
        f"({', '.join(dict.fromkeys(r['task'] for r in run['results']))}; positions "
        f"{', '.join(cfg['positions'])}; {cfg['seeds']} seed(s) each), "
        f"{run['wall_s'] / 60:.1f} min wall on {run['jobs']} worker processes ({len(run.get('phases', [1]))} "
        f"phase(s)), {run['cpu_s'] / 60:.1f} CPU-min in the jobs; {run.get('cores')} cores shared with other work "
        f"(load average at the start: {_loads(run)}); torch {run['torch']}, Python {run['python']}.",
        f"Model: {first['layers']} layers, d_model {cfg['d_model']}, {cfg['heads']} heads, pre-LayerNorm, "
        f"AdamW, batch 32, cosine schedule; steps per task: "
        + ", ".join(f"{t} {int(s['steps'] * cfg['step_factor'])}" for t, s in run["settings"].items()) + ".",
    ]
    checks = [v["greedy"] for r in run["results"] for v in r["results"].values() if "greedy" in v]
    if checks:
        total = sum(c["n"] for c in checks)
        agree = sum(round(c["agree"] * c["n"]) for c in checks)
        right = sum(round(c["greedy_exact"] * c["n"]) for c in checks)
        lines.append(f"Second check of exact match: on {total} fresh test sequences of the seq2seq tasks (lengths up "
                     f"to 256), greedy decoding and the teacher-forced pass gave the same verdict on {agree} "
                     f"({right} decoded exactly right).")
    for note in run.get("notes", []):
        lines.append(f"NOTE: {note}")
    return "\n".join(lines)


def write_report(run: dict[str, Any], out: Path) -> None:
    paths = plots(run, out)
    text = ["# Length extrapolation", "", summary(run), "", "## What the numbers say", ""]
    text += [f"- {f}" for f in findings(run)]
    text += ["", "## Tables", "", tables(run), ""]
    text += [f"![{p.stem}]({p.name})" for p in paths]
    (out / "report.md").write_text("\n".join(text) + "\n")


def publish(out: Path, docs: Path) -> None:
    """Copy the run in ``out`` into ``docs/long_context.md`` (between its markers) and its plots."""
    run = json.loads((out / "results.json").read_text())
    for name in PLOTS:
        src = out / f"long_context_{name}.png"
        if src.exists():
            shutil.copy(src, docs / src.name)
    page = docs / "long_context.md"
    text = page.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{page} has no {BEGIN} ... {END} section to fill")
    body = "\n".join([summary(run), "", *[f"- {f}" for f in findings(run)], "", tables(run)])
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    page.write_text(f"{head}{BEGIN}\n{body}\n{END}{tail}")
    print(f"updated {page}")
