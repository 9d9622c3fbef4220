"""Training curves of runs (their `metrics.jsonl`) as one PNG: `mlxrl plot RUN_DIR [...]`.

Panels, each drawn when some run logged it: the loss; GRPO's `reward`; DPO's `rewards/margins`
and `rewards/accuracies`. Evaluations during training (`eval_*`) are dashed in the panel of their
training metric. Each run keeps one colour in every panel and is labelled by its folder name;
runs of different methods (whose losses have different scales) get a loss panel each, with its
own y axis. A single run's title names it.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlxrl.errors import MlxrlError

PANELS = (("loss", "loss"), ("reward", "reward (GRPO)"), ("rewards/margins", "reward margin (DPO)"),
          ("rewards/accuracies", "preference accuracy (DPO)"))


def read_metrics(run_dir: str | Path) -> list[dict]:
    from mlxrl.metrics_log import read_metrics as read

    rows = read(Path(run_dir))
    if not rows:
        raise MlxrlError(f"no metrics.jsonl in {run_dir} (is it a training output_dir?)")
    return rows


def run_method(run_dir: str | Path) -> str | None:
    """The run's method (sft/dpo/grpo) from its trainer_state.json or config record."""
    from mlxrl.run_dir import RUN_FILE, STATE_FILE, checkpoint_folders

    folder = Path(run_dir)
    for where in (folder, *reversed(checkpoint_folders(folder))):
        try:
            method = json.loads((where / STATE_FILE).read_text()).get("method")
        except (OSError, ValueError, AttributeError):
            method = None
        if method:
            return method
        try:
            trainer_type = json.loads((where / RUN_FILE).read_text())["config"]["training"]["trainer_type"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        from mlxrl.config import METHODS

        return METHODS.get(str(trainer_type).upper())
    return None


def _panels(runs: dict[str, list[dict]], methods: dict[str, str | None]) -> list[tuple]:
    """(metric, title, runs drawn in it) for each panel with data."""
    kinds = sorted({m for m in methods.values() if m}, key=["sft", "dpo", "grpo"].index)
    out = []
    for key, label in PANELS:
        names = [n for n, rows in runs.items()
                 if any(key in r or f"eval_{key}" in r for r in rows)]
        if not names:
            continue
        if key == "loss" and len(kinds) > 1:  # own y axis per method
            for kind in kinds:
                drawn = [n for n in names if methods[n] == kind]
                if drawn:
                    out.append((key, f"loss ({kind.upper()})", drawn))
            drawn = [n for n in names if methods[n] is None]
            if drawn:
                out.append((key, "loss", drawn))
            continue
        out.append((key, label, names))
    return out


def _points(rows: list[dict], key: str) -> list[tuple]:
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]


def plot_runs(run_dirs: list[str | Path], output: str | Path | None = None,
              title: str | None = None) -> Path:
    """Draw the curves of `run_dirs` into `output` (default: first run's `curves.png`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MlxrlError("plotting needs matplotlib: pip install 'mlxrl[plot]'") from None
    runs = {Path(d).name or str(d): read_metrics(d) for d in run_dirs}
    methods = {Path(d).name or str(d): run_method(d) for d in run_dirs}
    cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    colours = {name: cycle[i % len(cycle)] for i, name in enumerate(runs)}
    panels = _panels(runs, methods)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, label, names) in zip(axes[0], panels):
        for name in names:
            for metric, style, suffix in ((key, "-", ""), (f"eval_{key}", "--", " (eval)")):
                points = _points(runs[name], metric)
                if points:
                    ax.plot(*zip(*points), style, marker="o", markersize=3, color=colours[name],
                            label=name + suffix)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(runs) > 1 or any(k.startswith("eval_") for r in runs[names[0]] for k in r):
            ax.legend(fontsize=8)
    if title is None and len(runs) == 1:
        name = next(iter(runs))
        method = methods[name]
        title = f"{name} ({method.upper()})" if method else name
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(output) if output else Path(run_dirs[0]) / "curves.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
