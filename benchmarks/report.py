"""The benchmarks' report: ``summary.md`` and the plots, from the ``results.csv`` and ``environment.json`` that
``run.py`` wrote into a results folder.

    python benchmarks/report.py benchmarks/results/<device>

Plots need matplotlib; without it the summary says so and lists no images.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections import defaultdict
from typing import Dict, List, Optional

MODES = ("forward", "backward", "forward+backward")
HEADLINE_MODE = "forward+backward"


def write_record(folder: str, name: str, data, title: str, text: str) -> None:
    """Writes a recorded table: ``folder/name.json`` (``data``) and ``folder/name.md`` (``title``, then ``text``)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    with open(os.path.join(folder, f"{name}.md"), "w") as f:
        f.write(f"# {title}\n\n{text}")


def _number(text: str) -> Optional[float]:
    return float(text) if text not in ("", None) else None


def read_rows(folder: str) -> List[dict]:
    with open(os.path.join(folder, "results.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key in ("batch", "channels", "height", "width", "m"):
            row[key] = int(row[key])
        for key in ("median_ms", "q1_ms", "q3_ms", "min_ms", "peak_bytes", "loss_rel_error", "grad_rel_error",
                    "floor_ms", "x_floor"):
            row[key] = _number(row.get(key))  # results written before the floors have no floor columns
    return rows


def series_key(row) -> tuple:
    return row["op"], row["batch"], row["channels"]


def group(rows: List[dict]) -> Dict[tuple, List[dict]]:
    """Rows by (op, batch, channels), in the order the sweep ran them."""
    groups = defaultdict(list)
    for row in rows:
        groups[series_key(row)].append(row)
    return groups


def provider_order(rows: List[dict]) -> List[str]:
    return list(dict.fromkeys(row["provider"] for row in rows))


def first_failure(rows: List[dict], provider: str) -> Optional[dict]:
    return next((row for row in rows if row["provider"] == provider and row["status"] != "ok"), None)


def _mib(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    mib = value / 2**20
    return f"{mib:.0f}" if mib >= 100 else f"{mib:.3g}"


def _ms(value: float) -> str:
    return f"{value:.0f} ms" if value >= 100 else f"{value:.3g} ms"


def _cell(row: Optional[dict]) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return row["status"]
    memory = "" if row["peak_bytes"] is None else f" / {_mib(row['peak_bytes'])} MiB"
    return f"{_ms(row['median_ms'])}{memory}"


def _error(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.1e}"


def _floor(row: dict) -> str:
    return f"{_ms(row['floor_ms'])} ({row['floor_bound']})" if row.get("floor_ms") is not None else ""


def headline_table(rows: List[dict], env: dict) -> List[str]:
    """One line per series: at the largest size fastkd's auto backend ran, its forward+backward time, its
    floor and the multiple, and the fastest other provider at that size with its time as a ratio."""
    auto = env.get("auto", {})
    lines = ["| op | B, C | H x W | fastkd (auto) | time | floor | x floor | best alternative | its time "
             "| its time / fastkd | its loss error |", "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for (op, batch, channels), rows_of_series in group(rows).items():
        table = [row for row in rows_of_series if row["mode"] == HEADLINE_MODE and row["status"] == "ok"]
        ours = [row for row in table if row["provider"] == auto.get(op) and row["floor_ms"] is not None]
        failure = first_failure([row for row in rows_of_series if row["mode"] == HEADLINE_MODE], auto.get(op))
        if not ours and failure is not None:  # the reason is in the series' "Not measured" list
            lines.append(f"| {op} | {batch}, {channels} | | {auto[op]} | {failure['status']} | | | | | | |")
        if not ours:
            continue
        best = max(ours, key=lambda row: row["m"])
        others = [row for row in table if row["m"] == best["m"] and row["kind"] != "fastkd"]
        alternative = min(others, key=lambda row: row["median_ms"]) if others else None
        compared = ("none ran | | |" if alternative is None else
                    f"{alternative['provider']} | {_ms(alternative['median_ms'])} | "
                    f"{alternative['median_ms'] / best['median_ms']:.3g}x | {_error(alternative['loss_rel_error'])}")
        lines.append(f"| {op} | {batch}, {channels} | {best['height']}x{best['width']} | {best['provider']} | "
                     f"{_ms(best['median_ms'])} | {_floor(best)} | {best['x_floor']:.3g}x | {compared} |")
    return lines if len(lines) > 2 else []


def headline(rows: List[dict]) -> List[str]:
    """Per series: at the largest m the naive version ran, the fastest fastkd backend's time and peak
    memory as a ratio of every other provider's; and the largest m each provider ran."""
    lines = []
    table = [row for row in rows if row["mode"] == HEADLINE_MODE]
    naive_ok = [row for row in table if row["provider"] == "naive" and row["status"] == "ok"]
    fastkd_rows = [row for row in table if row["kind"] == "fastkd" and row["status"] == "ok"]
    if not fastkd_rows:
        return lines
    if naive_ok:
        m = max(row["m"] for row in naive_ok)
        at_m = {row["provider"]: row for row in table if row["m"] == m and row["status"] == "ok"}
        best = min((row for row in at_m.values() if row["kind"] == "fastkd"), key=lambda row: row["median_ms"])
        size = f"{best['height']}x{best['width']}"
        parts = []
        for name, other in at_m.items():
            if other["kind"] == "fastkd":
                continue
            memory = ""
            if best["peak_bytes"] and other["peak_bytes"]:
                memory = f", {other['peak_bytes'] / best['peak_bytes']:.3g}x the memory"
            parts.append(f"{name} takes {other['median_ms'] / best['median_ms']:.3g}x the time{memory}, "
                         f"loss error {_error(other['loss_rel_error'])}")
        lines.append(f"at {size} (m = {m}, the largest the naive version ran), {best['provider']} "
                     f"{_ms(best['median_ms'])}, {_mib(best['peak_bytes'])} MiB, loss error "
                     f"{_error(best['loss_rel_error'])}: " + "; ".join(parts))
    reached = []
    for provider in provider_order(table):
        ok = [row["m"] for row in table if row["provider"] == provider and row["status"] == "ok"]
        failure = first_failure(table, provider)
        limit = f"largest m {max(ok)}" if ok else "no size"
        reached.append(f"{provider}: {limit}" + (f" ({failure['status']} from m = {failure['m']})" if failure else ""))
    lines.append("sizes reached: " + "; ".join(reached))
    return lines


def series_table(rows: List[dict], auto: Optional[str] = None) -> List[str]:
    """Forward+backward median time / peak memory per size (rows) and provider (columns), with the floor
    and fastkd's auto backend as a multiple of it where the rows have floors; then the loss's relative error
    against the float64 reference."""
    table = [row for row in rows if row["mode"] == HEADLINE_MODE]
    names = provider_order(table)
    sizes = list(dict.fromkeys((row["height"], row["width"], row["m"]) for row in table))
    cells = {(row["m"], row["provider"]): row for row in table}
    has_floors = any(row["floor_ms"] is not None for row in table)
    extra = (["floor"] + ([f"{auto} x floor"] if auto in names else [])) if has_floors else []
    lines = ["| H x W (m) | " + " | ".join(names + extra) + " |", "|---|" + "---:|" * len(names + extra)]
    for height, width, m in sizes:
        entries = [_cell(cells.get((m, name))) for name in names]
        if has_floors:
            entries.append(next((_floor(cells[m, name]) for name in names if (m, name) in cells), ""))
        if has_floors and auto in names:
            ours = cells.get((m, auto))
            entries.append(f"{ours['x_floor']:.3g}x" if ours and ours["x_floor"] is not None else "")
        lines.append(f"| {height}x{width} ({m}) | " + " | ".join(entries) + " |")
    lines += ["", "Relative error of the loss (and of the student's gradient) against the float64 reference:", "",
              "| H x W (reference) | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for height, width, m in sizes:
        references = {cells[m, name]["reference"] for name in names if (m, name) in cells} - {""}
        entries = []
        for name in names:
            row = cells.get((m, name))
            ok = row is not None and row["status"] == "ok" and row["loss_rel_error"] is not None
            entries.append(f"{_error(row['loss_rel_error'])} ({_error(row['grad_rel_error'])})" if ok else "")
        lines.append(f"| {height}x{width} ({', '.join(sorted(references)) or 'none'}) | " + " | ".join(entries) + " |")
    failures = [row for row in table if row["status"] not in ("ok",)]
    notes = list(dict.fromkeys(f"{row['provider']} at {row['height']}x{row['width']}: {row['status']}, {row['note']}"
                               for row in failures if row["note"]))
    if notes:
        lines += ["", "Not measured:", ""] + [f"- {note}" for note in notes]
    return lines


def plot(rows: List[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(16, 9), sharex=True)
    names = provider_order(rows)
    colours = {name: plt.cm.tab10(index % 10) for index, name in enumerate(names)}
    for column, mode in enumerate(MODES):
        for name in names:
            ok = [row for row in rows if row["provider"] == name and row["mode"] == mode and row["status"] == "ok"]
            failure = first_failure([row for row in rows if row["mode"] == mode], name)
            label = name + (f" ({failure['status']} from m={failure['m']})" if failure else "")
            if not ok:
                continue
            ms = [row["m"] for row in ok]
            median = [row["median_ms"] for row in ok]
            spread = [[row["median_ms"] - row["q1_ms"] for row in ok], [row["q3_ms"] - row["median_ms"] for row in ok]]
            axes[0, column].errorbar(ms, median, yerr=spread, marker="o", ms=3, capsize=2, label=label,
                                     color=colours[name])
            peaks = [(row["m"], row["peak_bytes"] / 2**20) for row in ok if row["peak_bytes"]]
            if peaks:
                axes[1, column].plot(*zip(*peaks), marker="o", ms=3, label=label, color=colours[name])
        axes[0, column].set_title(mode)
        axes[0, column].set_ylabel("median time (ms)")
        axes[1, column].set_ylabel("peak memory above the inputs (MiB)")
        axes[1, column].set_xlabel("m = H x W")
        for axis in axes[:, column]:
            axis.set_xscale("log")
            axis.set_yscale("log")
            axis.grid(True, which="both", alpha=0.3)
    axes[0, 2].legend(fontsize=8)
    axes[1, 2].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(folder: str) -> str:
    rows = read_rows(folder)
    with open(os.path.join(folder, "environment.json")) as handle:
        env = json.load(handle)
    try:
        import matplotlib  # noqa: F401

        plots = True
    except ImportError:
        plots = False
    lines = [f"# fastkd benchmarks on {env['device']}", "",
             f"`{env['command']}`, {env['minutes']} minutes. torch {env['torch']}, triton {env['triton']}, "
             f"pykeops {env['pykeops']}, fastkd {env['fastkd']}; {env['threads']} threads; TF32: {env['tf32']}; "
             f"inputs {env['dtype']}, teacher = student x (1 + {env['mismatch']:g} noise); medians of "
             f"{env['repeats']} timed repetitions after warm-up; time limit {env['time_limit_s']:g} s per "
             f"forward+backward" + (f"; memory budget {env['memory_budget_gib']} GiB" if "memory_budget_gib" in env
                                    else "") + ".", "",
             "Cells: median forward+backward time / peak memory above the inputs (gradients included). `oom`: "
             "out of memory; `timeout`: over the time limit, measured or predicted from the previous size. "
             "Forward and backward alone are in `results.csv` and the plots.", ""]
    if "copy_gb_s" in env:
        lines += [f"Floors measured at the start of the run on {env['device']}: copy bandwidth {env['copy_gb_s']:.3g} "
                  f"GB/s (bytes read + written), float32 GEMM {env['fp32_gemm_gflop_s']:.3g} GFLOP/s, float64 GEMM "
                  f"{env['fp64_gemm_gflop_s']:.3g} GFLOP/s. A row's floor is max(bytes that must move once / "
                  "bandwidth, FLOPs / GEMM rate), the float64 rate for the full graphs: the inputs read once, and "
                  "in backward the student's gradient written once; FLOPs from `fastkd.ops.costs`. `x floor` is "
                  "the measured median over the floor.", ""]
        summary = headline_table(rows, env)
        if summary:
            lines += [f"## Headline on {env['device']}", "",
                      "Forward+backward at the largest size of each series that fastkd's auto backend (the one "
                      "`backend=\"auto\"` picks here) ran; the best alternative is the fastest other provider at "
                      "that size.", ""] + summary + [""]
    unavailable = env.get("unavailable", {})
    if any(unavailable.values()):
        lines += ["Not run on this device:", ""]
        lines += [f"- {op}, {name}: {reason}" for op, reasons in unavailable.items() for name, reason in reasons.items()]
        lines.append("")
    if not plots:
        lines += ["(No plots: matplotlib is not installed.)", ""]
    for (op, batch, channels), rows_of_series in group(rows).items():
        title = f"{op}, B={batch}, C={channels}, {env['dtype']}"
        lines += [f"## {title}", ""]
        lines += [f"- {line}" for line in headline(rows_of_series)] + [""]
        if plots:
            image = f"{op}_B{batch}_C{channels}.png"
            plot(rows_of_series, os.path.join(folder, image), f"{title} on {env['device']}")
            lines += [f"![{title}]({image})", ""]
        lines += series_table(rows_of_series, env.get("auto", {}).get(op)) + [""]
    path = os.path.join(folder, "summary.md")
    with open(path, "w") as handle:
        handle.write("\n".join(lines))
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(write_report(sys.argv[1]))
