"""The picture: latency CDFs, throughput bars, failover-time histogram (matplotlib).

``python -m bench.plot RESULT.json OUT.png`` redraws a saved result.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.plan import LABELS

CDF_OP = ("set", 16)  # the operation whose latency distribution is drawn


def _cdf_cells(result: dict[str, Any], clients: int, pipeline: int) -> dict[str, Any]:
    out = {}
    for name, config in result["configurations"].items():
        for cell in config.get("cells", []):
            if (
                cell.get("supported")
                and (cell["op"], cell["size"]) == CDF_OP
                and cell["clients"] == clients
                and cell["pipeline"] == pipeline
            ):
                out[name] = cell
    return out


def draw(result: dict[str, Any], path: Path) -> None:
    """Write the 2x2 figure of ``result`` to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    for ax, (clients, pipeline, title) in zip(
        axes[0],
        ((1, 1, "1 client, closed loop"), (50, 1, "50 clients")),
        strict=True,
    ):
        for name, cell in _cdf_cells(result, clients, pipeline).items():
            xs = [ms for ms, _ in cell["cdf"]]
            ys = [fraction for _, fraction in cell["cdf"]]
            ax.step(xs, ys, where="post", label=LABELS.get(name, name))
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms, log scale)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"Latency CDF, SET 16 B, {title}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")

    _throughput_bars(axes[1][0], result)
    _failover_histogram(axes[1][1], result)
    taken = result["taken"]
    machine = result["machine"]
    fig.suptitle(
        f"ftproxy benchmark, {taken} - {machine['cpus']} x {machine['cpu_model']}, "
        f"Python {machine['python']}{' (quick)' if result['quick'] else ''}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _throughput_bars(ax: Any, result: dict[str, Any]) -> None:
    configs = [(n, c) for n, c in result["configurations"].items() if c["available"]]
    loads = list(dict.fromkeys(load for _, c in configs for load in c["by_load"]))
    width = 0.8 / max(1, len(configs))
    for i, (name, config) in enumerate(configs):
        xs = [j + i * width for j in range(len(loads))]
        ys = [(config["by_load"].get(load) or {}).get("rps") or 0 for load in loads]
        ax.bar(xs, ys, width, label=LABELS.get(name, name))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(loads))], loads)
    ax.set_yscale("log")
    ax.set_ylabel("requests/s (log scale, geometric mean over ops)")
    ax.set_title("Throughput")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _failover_histogram(ax: Any, result: dict[str, Any]) -> None:
    series = {
        # A log axis: a gap of 0 (no pause seen) has no place on it.
        LABELS.get(name, name): [
            t["failover_s"] for t in s["trials"] if (t.get("failover_s") or 0) > 0
        ]
        for name, s in result["failover"].items()
    }
    series = {k: v for k, v in series.items() if v}
    if series:
        low = min(min(v) for v in series.values())
        high = max(max(v) for v in series.values())
        edges = _log_edges(low, high, 30)
        ax.hist(list(series.values()), bins=edges, label=list(series.keys()), stacked=False)
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("failover time (s, log scale): last reply of the old primary to first of new")
    ax.set_ylabel("kills")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title("Failover: primary (Raft: leader) SIGKILLed, or SIGSTOPped")
    ax.grid(True, which="both", alpha=0.3)


def _log_edges(low: float, high: float, count: int) -> list[float]:
    low, high = low / 1.2, high * 1.2
    step = (high / low) ** (1 / count)
    return [low * step**i for i in range(count + 1)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__)
    parser.add_argument("result", type=Path)
    parser.add_argument("png", type=Path)
    args = parser.parse_args(argv)
    draw(json.loads(args.result.read_text()), args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
