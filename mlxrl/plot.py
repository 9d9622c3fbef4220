"""Training curves of runs (their `metrics.jsonl`) as one PNG: `mlxrl plot RUN_DIR [...]`.

Panels, each drawn when some run logged it: `loss`; GRPO's `reward`; DPO's `rewards/margins`
and `rewards/accuracies`. Each run is one line, labelled by its folder name.
"""

from __future__ import annotations

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
    panels = [(key, label) for key, label in PANELS
              if any(key in row for rows in runs.values() for row in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for name, rows in runs.items():
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=name)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(output) if output else Path(run_dirs[0]) / "curves.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
