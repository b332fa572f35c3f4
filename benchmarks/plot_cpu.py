"""Plot the CPU suite's speed-ups (pyquant 2-bit against F.linear bf16 and torch's int4 kernel;
mode "lut" dashed and "lut3" dotted, in the same colour, where the report has them).

    python benchmarks/plot_cpu.py [benchmarks/results/cpu_full_2t.json]

Writes the PNG beside the JSON. Needs matplotlib, which pyquant itself does not
(`pip install matplotlib`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent / "results" / "cpu_full_2t.json"


def plot(report_path: Path) -> Path:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.loads(report_path.read_text())
    shapes: dict[str, list[dict]] = {}
    for row in report["results"]:
        shapes.setdefault(f"{row['in']}x{row['out']}", []).append(row)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, other, title in ((axes[0], "bf16", "vs F.linear bf16"), (axes[1], "int4", "vs torch int4 (g128)")):
        for name, rows in shapes.items():
            rows = sorted(rows, key=lambda r: r["batch"])
            line, = ax.plot([r["batch"] for r in rows], [r["speedup"][other] for r in rows], marker="o", label=name)
            for mode, style in (("lut", "--"), ("lut3", ":")):
                if f"{mode}_speedup" in rows[0]:
                    ax.plot([r["batch"] for r in rows], [r[f"{mode}_speedup"][other] for r in rows], marker="x",
                            linestyle=style, color=line.get_color(), label=f"{name} {mode}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("batch (tokens)")
        ax.set_title(f"pyquant 2-bit speed-up {title}")
    axes[0].set_ylabel("speed-up (> 1: pyquant faster)")
    axes[1].legend(title="in x out", fontsize=8)
    machine = report["machine"]
    core = f" ({machine['cpu_core']})" if machine.get("cpu_core") else ""  # (reports from session 29 on)
    fig.suptitle(f"{machine.get('cpu', 'CPU')}{core}, {machine.get('torch_threads', '?')} threads, {report['date'][:10]}",
                 fontsize=9)
    fig.tight_layout()
    out = report_path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(plot(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT))
