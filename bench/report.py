"""Figures -> the table, the targets, JSON, a Markdown page and a PNG chart."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.services import BENCH_DIR, NGINX_BINARY, REGISTRY_BINARY

PATHS = ("direct", "nginx", "proxy")
COLORS = {"direct": "#8c8c8c", "nginx": "#2ca02c", "proxy": "#1f77b4"}


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    # False where a ratio to the direct path means nothing (the registry's own memory).
    vs_direct: bool = True


def _metrics(aborts: int, streams: int) -> list[Metric]:
    rows = [
        Metric("get1", "blob GET, 1 stream", "MiB/s", True),
        Metric("get8", f"blob GET, {streams} streams (sum)", "MiB/s", True),
        Metric("put", "blob upload, monolithic PUT", "MiB/s", True),
        Metric("patch", "blob upload, chunked PATCH", "MiB/s", True),
    ]
    for cost in (5, 10):
        rows += [
            Metric(f"rps{cost}", f"manifest GET, 32 conns, bcrypt {cost}", "req/s", True),
            Metric(f"get_p50_{cost}", "  latency p50", "ms", False),
            Metric(f"get_p99_{cost}", "  latency p99", "ms", False),
        ]
    for cost in (5, 10):
        rows += [
            Metric(f"head_p50_{cost}", f"manifest HEAD, 1 conn, bcrypt {cost}: p50", "ms", False),
            Metric(f"head_p99_{cost}", "  p99", "ms", False),
            Metric(f"head_add_p50_{cost}", "  added over direct, p50", "ms", False, False),
            Metric(f"head_add_p99_{cost}", "  added over direct, p99", "ms", False, False),
        ]
    rows += [
        Metric("rss_peak", f"peak RSS, {streams} concurrent blob GETs", "MB", False, False),
        Metric("cpu_per_gib_get", "server CPU per GiB served", "CPU s", False, False),
        Metric("cpu_per_gib_get1", "server CPU per GiB served, 1 stream", "CPU s", False, False),
    ]
    rows += _relay_metrics(streams)
    rows += [
        Metric("rss_peak_aborts", f"proxy peak RSS during {aborts} aborted GETs", "MB", False),
        Metric("rss_after_aborts", "  RSS after them", "MB", False),
        Metric("rss_growth_aborts", "  growth over them (last 3 - first 3 readings)", "MB", False),
        Metric("fds_growth_aborts", "  growth of open file descriptors", "fds", False),
        Metric(
            "rss_heads_per_1000", "proxy RSS per 1,000 unfinished heads at the cap", "MB", False
        ),
        Metric("tls_get1", "proxy over TLS: blob GET, 1 stream", "MiB/s", True, False),
        Metric("rss_tls_idle_per_1000", "  RSS per 1,000 idle TLS connections", "MB", False),
        Metric("rss_tls_pending_per_1000", "  RSS per 1,000 pending handshakes", "MB", False),
        Metric(
            "rss_tls_heads_per_1000", "  RSS per 1,000 unfinished heads at the cap", "MB", False
        ),
    ]
    rows += _fairness_metrics()
    return rows


def _fairness_metrics() -> list[Metric]:
    """Fresh logins with and without a wrong-password flood from another address."""
    rows = [Metric("login_idle_p50", "fresh login, bcrypt 10, unloaded: p50", "ms", False, False)]
    for mode in ("at_once", "retry_after"):
        label = mode.replace("_", "-")
        rows += [
            Metric(
                f"login_flood_{mode}_p50",
                f"  200 wrong-password floods, resent {label}: p50",
                "ms",
                False,
                False,
            ),
            Metric(f"login_flood_{mode}_ratio", "    flooded / unloaded", "x", False, False),
        ]
    return rows


def _fairness_targets(figures: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Fresh login under the flood <= 3x unloaded, both figures in the line."""
    idle = figures.get("login_idle_p50", {}).get("proxy")
    targets = []
    for mode in ("at_once", "retry_after"):
        flooded = figures.get(f"login_flood_{mode}_p50", {}).get("proxy")
        ratio = flooded / idle if idle and flooded is not None else None
        shown = "no figure" if ratio is None else f"{flooded:.1f} ms vs {idle:.1f} ms unloaded"
        targets.append(
            {
                "target": f"fresh login p50 under 200 wrong-password requests (resent "
                f"{mode.replace('_', '-')}) from another address <= 3x unloaded ({shown})",
                "value": ratio,
                "threshold": 3.0,
                "unit": "x",
                "met": ratio is not None and ratio <= 3.0,
            }
        )
    return targets


def _relay_metrics(streams: int) -> list[Metric]:
    """The proxy alone, fast_blob_relay on and off in the same rounds (issue 18)."""
    rows = []
    for relay in ("fast", "normal"):
        for key, what in (("get1", "1 stream"), ("get8", f"{streams} streams")):
            label = f"proxy blob GET {what}, {relay} relay"
            rows += [
                Metric(f"relay_{relay}_{key}", label, "MiB/s", True, False),
                Metric(f"relay_{relay}_cpu_{key}", "  proxy CPU per GiB", "CPU s", False, False),
            ]
    return rows


def _relay_targets(figures: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Issue 18's targets for the lean blob relay."""

    def target(name: str, value: float | None, threshold: float, unit: str) -> dict[str, Any]:
        at_least = unit == "x"
        met = value is not None and (value >= threshold if at_least else value <= threshold)
        return {"target": name, "value": value, "threshold": threshold, "unit": unit, "met": met}

    def proxy(key: str) -> float | None:
        return figures.get(key, {}).get("proxy")

    return [
        target("blob GET 1 stream >= 0.75x direct", _ratio(figures, "get1", "direct"), 0.75, "x"),
        target("blob GET 8 streams >= 0.7x direct", _ratio(figures, "get8", "direct"), 0.7, "x"),
        target("relay CPU, 1 stream <= 0.5 CPU s/GiB", proxy("cpu_per_gib_get1"), 0.5, "CPU s"),
        target("relay CPU, 8 streams <= 0.5 CPU s/GiB", proxy("cpu_per_gib_get"), 0.5, "CPU s"),
        target("peak RSS at 8 concurrent blob GETs <= 60 MB", proxy("rss_peak"), 60.0, "MB"),
    ]


# --- building the results ----------------------------------------------------------------


def _command_version(args: list[str]) -> str:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "unknown"
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    cores = os.cpu_count() or 0
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": cores,
        "memory_gib": round(mem_gib, 1),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "aiohttp": importlib.metadata.version("aiohttp"),
        "nginx": _command_version([NGINX_BINARY, "-v"]),
        "registry": _command_version([REGISTRY_BINARY, "--version"]),
        "curl": _command_version([shutil.which("curl") or "curl", "--version"]),
        "wrk": _command_version([shutil.which("wrk") or "wrk", "--version"]).split(" [")[0],
    }
    with contextlib.suppress(OSError):
        # Other work on the machine shows here: the figures are only comparable within a run.
        info["load_average_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    info["summary"] = (
        f"{cpu}, {cores} cores, {mem_gib:.0f} GiB, {info['kernel']}, "
        f"Python {info['python']}, aiohttp {info['aiohttp']}"
    )
    return info


def _ratio(figures: dict[str, dict[str, float]], key: str, base: str) -> float | None:
    row = figures.get(key, {})
    if row.get("proxy") is None or not row.get(base):
        return None
    return row["proxy"] / row[base]


def _derive(figures: dict[str, dict[str, float]]) -> None:
    """Added HEAD latency: each path's figure minus the direct path's."""
    for cost in (5, 10):
        for pct in ("p50", "p99"):
            row = figures.get(f"head_{pct}_{cost}")
            if not row or "direct" not in row:
                continue
            figures[f"head_add_{pct}_{cost}"] = {
                path: value - row["direct"] for path, value in row.items()
            }


def _targets(figures: dict[str, dict[str, float]], aborts: int) -> list[dict[str, Any]]:
    """The issue's targets, each with the figure it is judged on."""

    def ratio_target(name: str, key: str, base: str, at_least: float) -> dict[str, Any]:
        value = _ratio(figures, key, base)
        return {
            "target": name,
            "value": value,
            "threshold": at_least,
            "unit": "x",
            "met": value is not None and value >= at_least,
        }

    def limit_target(name: str, key: str, at_most: float, unit: str) -> dict[str, Any]:
        value = figures.get(key, {}).get("proxy")
        return {
            "target": name,
            "value": value,
            "threshold": at_most,
            "unit": unit,
            "met": value is not None and value <= at_most,
        }

    return [
        ratio_target("blob GET 1 stream >= 1.5x nginx", "get1", "nginx", 1.5),
        ratio_target("blob GET 1 stream >= 0.5x direct", "get1", "direct", 0.5),
        ratio_target("blob GET 8 streams >= 1.5x nginx", "get8", "nginx", 1.5),
        ratio_target("blob GET 8 streams >= 0.5x direct", "get8", "direct", 0.5),
        ratio_target("blob PUT (monolithic) >= 0.9x direct", "put", "direct", 0.9),
        ratio_target("blob PATCH (chunked) >= 0.9x direct", "patch", "direct", 0.9),
        ratio_target("manifest GET rps, bcrypt 10 >= 20x nginx", "rps10", "nginx", 20),
        ratio_target("manifest GET rps, bcrypt 10 >= 0.45x direct", "rps10", "direct", 0.45),
        limit_target("HEAD added p50, bcrypt 5 <= 1 ms", "head_add_p50_5", 1.0, "ms"),
        limit_target("HEAD added p50, bcrypt 10 <= 1 ms", "head_add_p50_10", 1.0, "ms"),
        limit_target("peak RSS at 8 concurrent blob GETs <= 80 MB", "rss_peak", 80.0, "MB"),
        # Allocator noise aside: a leak of even 5 KB per aborted transfer shows as 5 MB here.
        limit_target(
            f"no RSS growth over {aborts} aborted GETs (<= 5 MB)", "rss_growth_aborts", 5.0, "MB"
        ),
        # One or two pooled keep-alive connections to the registry may come and go.
        limit_target(
            f"no fd growth over {aborts} aborted GETs (<= 2)", "fds_growth_aborts", 2.0, "fds"
        ),
        limit_target(
            "RSS per 1,000 unfinished heads at the cap <= 128 MB", "rss_heads_per_1000", 128, "MB"
        ),
        limit_target(
            "RSS per 1,000 idle TLS connections <= 64 MB", "rss_tls_idle_per_1000", 64, "MB"
        ),
        limit_target(
            "RSS per 1,000 pending TLS handshakes <= 64 MB", "rss_tls_pending_per_1000", 64, "MB"
        ),
        *_fairness_targets(figures),
    ]


def build(
    *,
    started: datetime,
    seconds: float,
    settings: dict[str, Any],
    figures: dict[str, dict[str, float]],
    samples: dict[str, dict[str, list[float]]],
    extra: dict[str, Any],
) -> dict[str, Any]:
    _derive(figures)
    aborts = int(extra.get("aborts", {}).get("count", settings["aborts"]))
    rows = []
    for metric in _metrics(aborts, settings["streams"]):
        if metric.key not in figures:
            continue
        values = figures[metric.key]
        rows.append(
            {
                "key": metric.key,
                "label": metric.label,
                "unit": metric.unit,
                "higher_is_better": metric.higher_is_better,
                **{path: values.get(path) for path in PATHS},
                "proxy/nginx": _ratio(figures, metric.key, "nginx"),
                "proxy/direct": _ratio(figures, metric.key, "direct") if metric.vs_direct else None,
            }
        )
    return {
        "date": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "duration_s": round(seconds, 1),
        "machine": machine(),
        "settings": settings,
        "notes": [
            "direct: the registry itself, no auth; nginx: distribution's nginx recipe "
            f"(worker_processes {settings['nginx_workers']}: "
            f"{extra.get('nginx_workers', '?')} workers); proxy: registry-proxy. "
            "Same htpasswd file.",
            "Figures are medians over rounds that alternate the paths; peak RSS is the maximum.",
            "Client: curl to /dev/null for blobs, wrk for manifest GET, one raw keep-alive "
            "socket for HEAD latency; all on the same machine as the servers.",
            "The machine may be shared with other jobs: compare figures within one run only.",
        ],
        "rows": rows,
        "targets": _targets(figures, aborts) + _relay_targets(figures),
        "samples": samples,
        "extra": extra,
    }


# --- text --------------------------------------------------------------------------------


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) >= 0.001 else f"{value:.3f}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _cells(row: dict[str, Any]) -> list[str]:
    return [
        f"{row['label']} ({row['unit']})",
        *(_number(row[path]) for path in PATHS),
        _times(row["proxy/nginx"]),
        _times(row["proxy/direct"]),
    ]


HEADER = ["metric", "direct", "nginx", "proxy", "proxy/nginx", "proxy/direct"]


def table(results: dict[str, Any]) -> str:
    """The plain-text table printed on stdout."""
    lines = [HEADER, *(_cells(row) for row in results["rows"])]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]

    def fmt(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])

    out = [
        f"registry-proxy benchmark, {results['date']}, {results['settings']['mode']} run, "
        f"blob {results['settings']['blob_size'] / (1 << 20):.0f} MiB",
        f"machine: {results['machine']['summary']}",
        "",
        fmt(HEADER),
        fmt(["-" * w for w in widths]),
    ]
    out += [fmt(cells) for cells in lines[1:]]
    return "\n".join(out)


def _target_value(target: dict[str, Any]) -> str:
    value = target["value"]
    if value is None:
        return "no figure"
    return f"{value:.2f}x" if target["unit"] == "x" else f"{value:.2f} {target['unit']}"


def targets_text(results: dict[str, Any]) -> str:
    lines = ["targets:"]
    for target in results["targets"]:
        mark = "met   " if target["met"] else "MISSED"
        lines.append(f"  {mark} {target['target']}: {_target_value(target)}")
    return "\n".join(lines)


def markdown(results: dict[str, Any], chart_name: str | None, heading: str = "#") -> str:
    """Date, machine, table, targets and chart, as Markdown."""
    settings = results["settings"]
    machine_info = results["machine"]
    out = [
        f"{heading} Results: {results['date']}",
        "",
        f"- machine: {machine_info['summary']}",
        f"- servers: {machine_info['registry']}; {machine_info['nginx']}; "
        f"clients: {machine_info['curl'].split(' (')[0]}, {machine_info['wrk']}",
        f"- proxy: {_proxy_code(results)}",
        f"- run: {settings['mode']}, {results['duration_s']:.0f} s; blob "
        f"{settings['blob_size'] / (1 << 20):.0f} MiB, {settings['streams']} streams; wrk "
        f"{settings['wrk_connections']} connections x {settings['wrk_seconds']:.0f} s",
        "",
    ]
    out += [f"{note}  " for note in results["notes"]]
    if chart_name:
        out += ["", f"![benchmark chart, {results['date']}]({chart_name})"]
    out += ["", "| " + " | ".join(HEADER) + " |", "|---" + "|---:" * (len(HEADER) - 1) + "|"]
    out += ["| " + " | ".join(_cells(row)) + " |" for row in results["rows"]]
    out += ["", "| target | proxy | met |", "|---|---:|:---:|"]
    for target in results["targets"]:
        met = "yes" if target["met"] else "**no**"
        out.append(f"| {target['target']} | {_target_value(target)} | {met} |")
    return "\n".join(out) + "\n"


def _proxy_code(results: dict[str, Any]) -> str:
    code = results["extra"].get("proxy_code", {})
    commit = str(code.get("commit", ""))[:12] or "unknown commit"
    if code.get("source") == "git":
        return f"commit {commit} (`--proxy-rev {code.get('rev')}`)"
    dirty = " plus uncommitted changes" if code.get("uncommitted_changes_in_proxy") else ""
    return f"working tree at {commit}{dirty}"


README = BENCH_DIR / "README.md"
BEGIN_MARK = "<!-- results:begin (written by bench/run --publish) -->"
END_MARK = "<!-- results:end -->"


def update_readme(results: dict[str, Any], chart_name: str | None) -> bool:
    """Replace the results section of bench/README.md; False if its markers are missing."""
    try:
        text = README.read_text()
    except OSError:
        return False
    head, begin, rest = text.partition(BEGIN_MARK)
    _, end, tail = rest.partition(END_MARK)
    if not begin or not end:
        return False
    body = markdown(results, chart_name, heading="##")
    README.write_text(f"{head}{BEGIN_MARK}\n{body}{END_MARK}{tail}")
    return True


# --- chart -------------------------------------------------------------------------------


def ensure_matplotlib() -> bool:
    """Import matplotlib, installing it into this virtualenv only when it is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if sys.prefix == sys.base_prefix:
            print("bench: matplotlib missing and not in a virtualenv: no chart", file=sys.stderr)
            return False
        print("bench: installing matplotlib into the virtualenv for the chart", file=sys.stderr)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"], check=False
        )
        if proc.returncode != 0:
            print("bench: could not install matplotlib: no chart", file=sys.stderr)
            return False
    return True


def _bars(ax: Any, groups: list[str], values: dict[str, list[float | None]], log: bool) -> None:
    width = 0.8 / len(PATHS)
    for index, path in enumerate(PATHS):
        xs = [g + (index - 1) * width for g in range(len(groups))]
        ys = [v if v is not None else 0.0 for v in values[path]]
        bars = ax.bar(xs, ys, width, label=path, color=COLORS[path])
        for bar, value in zip(bars, values[path], strict=True):
            if value is not None:
                ax.annotate(
                    _number(value),
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    rotation=90 if len(groups) > 3 else 0,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.margins(y=0.25)
    ax.grid(axis="y", alpha=0.3)


def write_chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {row["key"]: row for row in results["rows"]}

    def series(keys: list[str]) -> dict[str, list[float | None]]:
        return {p: [figures.get(k, {}).get(p) for k in keys] for p in PATHS}

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    streams = results["settings"]["streams"]

    ax = axes[0][0]
    _bars(
        ax,
        ["GET\n1 stream", f"GET\n{streams} streams", "upload\nPUT", "upload\nPATCH"],
        series(["get1", "get8", "put", "patch"]),
        log=False,
    )
    ax.set_title("blob throughput (MiB/s, higher is better)", fontsize=10)
    ax.legend(fontsize=8)

    ax = axes[0][1]
    _bars(ax, ["bcrypt cost 5", "bcrypt cost 10"], series(["rps5", "rps10"]), log=True)
    ax.set_title("authenticated manifest GET, 32 connections (req/s, log)", fontsize=10)

    ax = axes[1][0]
    _bars(
        ax,
        ["HEAD p50\ncost 5", "HEAD p99\ncost 5", "HEAD p50\ncost 10", "HEAD p99\ncost 10"],
        series(["head_p50_5", "head_p99_5", "head_p50_10", "head_p99_10"]),
        log=True,
    )
    ax.set_title("manifest HEAD latency, one connection (ms, log, lower is better)", fontsize=10)

    ax = axes[1][1]
    aborts = results["extra"].get("aborts", {})
    readings = [kib * 1024 / 1e6 for kib in aborts.get("rss_kib", [])]
    batch = aborts.get("batch", 1)
    xs = [index * batch for index in range(len(readings))]
    ax.plot(xs, readings, marker="o", color=COLORS["proxy"], label="proxy RSS after N aborts")
    start = results["extra"].get("proxy_rss_start_kib")
    if start:
        ax.axhline(start * 1024 / 1e6, color="#8c8c8c", linestyle=":", label="proxy RSS at start")
    if "rss_peak" in figures:
        peak = figures["rss_peak"]["proxy"]
        ax.axhline(peak, color=COLORS["proxy"], linestyle="-.", linewidth=1)
        ax.annotate(
            f"peak during {streams} concurrent GETs: {peak:.1f} MB",
            (0, peak),
            xytext=(2, 3),
            textcoords="offset points",
            fontsize=8,
        )
    if "peak_kib" in aborts:
        peak = aborts["peak_kib"] * 1024 / 1e6
        ax.annotate(
            f"peak during aborts: {peak:.1f} MB",
            (xs[-1] if xs else 0, peak),
            ha="right",
            xytext=(0, 3),
            textcoords="offset points",
            fontsize=8,
        )
        ax.axhline(peak, color="#ff7f0e", linestyle="-.", linewidth=1)
    ax.axhline(80, color="#d62728", linestyle="--", linewidth=1, label="target 80 MB")
    ax.set_ylim(0, max([85.0, *readings]) * 1.1)
    ax.set_xlabel("aborted blob GETs", fontsize=8)
    ax.set_title("proxy memory (RSS, MB)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)

    settings = results["settings"]
    fig.suptitle(
        f"registry-proxy vs nginx recipe vs direct registry · {results['date']}\n"
        f"{results['machine']['summary']} · blob {settings['blob_size'] / (1 << 20):.0f} MiB "
        f"({settings['mode']} run)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- files -------------------------------------------------------------------------------


def write_outputs(results: dict[str, Any], out: Path, *, publish: bool, chart: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stamp = results["date"].replace("-", "").replace(":", "")
    text = json.dumps(results, indent=2) + "\n"
    written = [out / f"results-{stamp}.json", out / "latest.json"]
    for path in written:
        path.write_text(text)
    chart_path: Path | None = None
    if chart and ensure_matplotlib():
        chart_path = out / "chart.png"
        write_chart(results, chart_path)
        written.append(chart_path)
    (out / "results.md").write_text(markdown(results, "chart.png" if chart_path else None))
    written.append(out / "results.md")
    if publish:
        (BENCH_DIR / "results.json").write_text(text)
        written.append(BENCH_DIR / "results.json")
        if chart_path is not None:
            shutil.copyfile(chart_path, BENCH_DIR / "chart.png")
            written.append(BENCH_DIR / "chart.png")
        if update_readme(results, "chart.png" if chart_path else None):
            written.append(README)
        else:
            print(f"bench: no results markers in {README}; left it alone", file=sys.stderr)
    print("\nwrote " + ", ".join(str(p) for p in written))
