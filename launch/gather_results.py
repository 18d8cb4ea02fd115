"""Gathers the runs under a directory (a sweep, a job array, several seeds) into one table.

Every run directory below ROOT that holds ``eval_results.json`` becomes a row with its ROSE mode, upper
percentile, seed, final step and metrics (read from its ``run_config.json`` and ``all_results.json``);
runs that differ only in the seed are then summarised as mean +- std. The table is printed as Markdown
and written to ``ROOT/results.json`` (and ``ROOT/results.md``).

    python launch/gather_results.py runs/rose-sweep-1234
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

KEYS = ("mode", "upper", "seed")


def collect(root: Path) -> list[dict]:
    """One row per finished run below ``root``, sorted by mode, upper and seed."""
    rows = []
    for evals in sorted(root.rglob("eval_results.json")):
        run = evals.parent
        config = json.loads((run / "run_config.json").read_text())
        results = json.loads((run / "all_results.json").read_text()) if (run / "all_results.json").is_file() else {}
        row = {"run": str(run.relative_to(root)), "mode": config["rose"]["mode"],
               "upper": config["rose"]["upper"], "seed": config["args"]["seed"],
               "global_step": results.get("global_step"), "world_size": config.get("world_size")}  # fmt: skip
        row.update(json.loads(evals.read_text()))
        rows.append(row)
    return sorted(rows, key=lambda r: (r["mode"], r["upper"], r["seed"]))


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation of every metric over the seeds of each (mode, upper)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["mode"], row["upper"]), []).append(row)
    summary = []
    for (mode, upper), members in groups.items():
        entry = {"mode": mode, "upper": upper, "seeds": len(members)}
        for metric in sorted({k for r in members for k in r if k.startswith("eval_")}):
            values = [r[metric] for r in members if metric in r]
            entry[metric] = statistics.fmean(values)
            entry[metric + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def markdown(rows: list[dict], summary: list[dict]) -> str:
    metrics = sorted({k for r in rows for k in r if k.startswith("eval_")})
    lines = ["| run | mode | upper | seed | step | " + " | ".join(metrics) + " |",
             "|---" * (5 + len(metrics)) + "|"]  # fmt: skip
    for r in rows:
        cells = [r["run"], r["mode"], r["upper"], r["seed"], r["global_step"]]
        cells += [f"{r[m]:.4f}" if m in r else "" for m in metrics]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "| mode | upper | seeds | " + " | ".join(metrics) + " |", "|---" * (3 + len(metrics)) + "|"]
    for s in summary:
        cells = [s["mode"], s["upper"], s["seeds"]]
        cells += [f"{s[m]:.4f} +- {s[m + '_std']:.4f}" if m in s else "" for m in metrics]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="directory whose run directories to gather (searched recursively)")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        sys.exit(f"gather_results.py: error: {args.root}: no such directory")
    rows = collect(args.root)
    if not rows:
        sys.exit(f"gather_results.py: error: no eval_results.json below {args.root}: have the runs finished?")
    summary = summarise(rows)
    table = markdown(rows, summary)
    (args.root / "results.json").write_text(json.dumps({"runs": rows, "summary": summary}, indent=2))
    (args.root / "results.md").write_text(table)
    print(table, end="")


if __name__ == "__main__":
    main()
