"""Learning curves as a PNG with matplotlib (an optional extra, imported only for `metrics --png`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_learning_curves(path: Path, records: list[dict[str, Any]], metric: str, title: str) -> None:
    """One line per site and a thicker one for the mean of `metric` over the rounds; written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    rounds = [r for r in records if isinstance(r.get("round"), int)]
    sites = sorted({s for r in rounds for s, m in (r.get("sites") or {}).items() if metric in m})
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        for site in sites:
            points = [(r["round"], r["sites"][site][metric]) for r in rounds if metric in r["sites"].get(site, {})]
            ax.plot([x for x, _ in points], [y for _, y in points], marker=".", linewidth=1, label=site)
        mean = [(r["round"], r["mean"][metric]) for r in rounds if metric in (r.get("mean") or {})]
        ax.plot([x for x, _ in mean], [y for _, y in mean], color="black", linewidth=2.5, label="mean")
        ax.set_xlabel("round (the global model each site received at its start)")
        ax.set_ylabel(metric)
        ax.set_title(f"{title}: {metric}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, format="png")
        tmp.replace(path)
    finally:
        plt.close(fig)
