"""RESULTS.md and the PNG plots, generated from the scenarios' JSON files.

Nothing here measures anything: it reads ``<out>/<scenario>.json`` as
written by run.py in the same run and renders them. Run it alone to
re-render after editing the layout::

    python bench/report.py bench/results bench/RESULTS.md
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from scenarios import SCENARIOS
from servers import SERVERS

# Fixed colours per server so every plot reads the same way.
COLORS = {"mailpush": "#d62728", "mailpush_shared": "#ff7f0e", "mailpush_py": "#e377c2", "triows": "#1f77b4", "websockets": "#2ca02c",
          "picows": "#9467bd", "node_ws": "#8c564b", "socketify": "#17becf", "floor": "#7f7f7f"}

# One line style per latency run of a server (bus x rate).
LINESTYLES = ["-", "--", ":", "-."]

# Avalanche outcomes and health-check answers.
OUTCOME_COLORS = {"upgrade": "#2ca02c", "503": "#ff7f0e", "reset/refused": "#9467bd", "timeout": "#d62728",
                  "other status": "#8c564b", "other": "#7f7f7f"}
HEALTH_COLORS = {"200": "#2ca02c", "503": "#ff7f0e", "timeout": "#d62728"}

# Plot size in inches at 100 dpi: readable on GitHub without zooming.
FIGSIZE = (9, 4.5)
DPI = 100


def _label(name: str) -> str:
    return SERVERS[name].label if name in SERVERS else name


def _bus(bus: str) -> str:
    return f"{bus} bus" if " " not in bus else bus


def _load(out: Path) -> dict[str, dict]:
    data = {}
    for name in SCENARIOS:
        path = out / f"{name}.json"
        if path.exists():
            data[name] = json.loads(path.read_text())
    return data


def _ok(results: dict) -> dict:
    return {k: v for k, v in results.items() if "error" not in v and "skipped" not in v}


def _save(plt, fig, path: Path, title: str) -> tuple[str, Path]:
    """Lay out, write and close one figure; (title, path) for the report."""
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return title, path


def plots(out: Path, data: dict) -> list[tuple[str, Path]]:
    """Write the PNGs; returns (title, path) for those written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []

    if "memory" in data and _ok(data["memory"]["results"]):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=FIGSIZE, dpi=DPI)
        for name, r in _ok(data["memory"]["results"]).items():
            xs = [0] + [p["connections"] for p in r["points"]]
            ys = [0] + [p["delta_kb"] / 1024 for p in r["points"]]
            ax1.plot(xs, ys, "o-", color=COLORS.get(name), label=_label(name))
            ax2.plot(xs[1:], [p["kb_per_conn"] for p in r["points"]], "o-", color=COLORS.get(name))
        ax1.set(xlabel="idle connections", ylabel="RSS above empty server (MiB)", title="Memory vs connections")
        ax2.set(xlabel="idle connections", ylabel="KiB per connection", title="Memory per connection")
        ax2.set_ylim(bottom=0)
        ax1.legend(fontsize=8)
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
        written.append(_save(plt, fig, out / "memory.png", "Memory vs connections"))

    for key, title, ylabel in (("upgrade", "Upgrade rate", "connections/s"),
                               ("fanout", "Fan-out", "deliveries/s"),
                               ("broadcast", "Broadcast", "deliveries/s")):
        if key not in data or not _ok(data[key]["results"]):
            continue
        ok = _ok(data[key]["results"])
        names = list(ok)
        med = [ok[n]["rate_median"] for n in names]
        lo = [m - ok[n]["rate_min"] for n, m in zip(names, med)]
        hi = [ok[n]["rate_max"] - m for n, m in zip(names, med)]
        fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
        bars = ax.bar(range(len(names)), med, yerr=[lo, hi], capsize=4,
                      color=[COLORS.get(n, "#999999") for n in names])
        for b, m in zip(bars, med):
            ax.annotate(f"{m:,.0f}", (b.get_x() + b.get_width() / 2, m), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 3), textcoords="offset points")
        ax.set_xticks(range(len(names)), [_label(n).replace(" (", "\n(").replace(", ", ",\n") for n in names],
                      fontsize=8)
        n = next(iter(ok.values()))["n"]
        spread = "min–max of the runs" if any(r.get("repeats", 1) > 1 for r in ok.values()) else "min–max"
        ax.set(ylabel=ylabel, title=f"{title}, {n:,} connections (median, {spread})")
        ax.grid(axis="y", alpha=0.3)
        written.append(_save(plt, fig, out / f"{key}.png", title))

    if "latency" in data and _ok(data["latency"]["results"]):
        fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
        for name, r in _ok(data["latency"]["results"]).items():
            for k, b in enumerate(r["runs"]):
                cdf = b["cdf_ms"]
                if not cdf:
                    continue
                ys = [i / len(cdf) for i in range(len(cdf))]
                ax.plot(cdf, ys, LINESTYLES[k % len(LINESTYLES)], color=COLORS.get(name),
                        label=f"{_label(name)}, {_bus(b['bus'])}, {b['connections']:,} connections, "
                              f"{b['target_rate']:,} events/s (p99 {b['p99_ms']:.2f} ms)")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set(xlabel="publish → receive (ms, log scale)", ylabel="fraction of events",
               title="Latency CDF")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        written.append(_save(plt, fig, out / "latency_cdf.png", "Latency CDF"))

    mp = _ok(data.get("avalanche", {}).get("results", {})).get("mailpush")
    if mp:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=FIGSIZE, dpi=DPI)
        h = mp["outcome_hist"]
        step, counts = h["step_s"], h["counts"]
        nb = len(next(iter(counts.values())))
        xs = [i * step for i in range(nb)]
        bottom = [0] * nb
        for kind, c in counts.items():
            ax1.bar(xs, c, width=step, align="edge", bottom=bottom, label=f"{kind} ({sum(c):,})",
                    color=OUTCOME_COLORS.get(kind))
            bottom = [b + v for b, v in zip(bottom, c)]
        ax1.axvline(1.0, color="k", ls="--", lw=1)
        ax1.set(xlabel=f"seconds from connect to outcome (last bar: ≥ {(nb - 1) * step:g} s)", ylabel="clients",
                title=f"{mp['clients']:,} clients, --max-connections {mp['limit']:,}")
        ax1.legend(fontsize=8)
        tl = mp["health"]["timeline"]
        for status in sorted({o for _, _, o in tl}):
            pts = [(t / 1e3, lat) for t, lat, o in tl if o == status]
            ax2.scatter([x for x, _ in pts], [y for _, y in pts], s=6, label=f"/healthz {status}",
                        color=HEALTH_COLORS.get(status, "#9467bd"))
        ax2.axvspan(0, mp["seconds"], color="#ffdd99", alpha=0.3, label="avalanche")
        ax2.set_yscale("log")
        ax2.set(xlabel="seconds since the first connect", ylabel="health check latency (ms, log)",
                title=f"/healthz on the listen port, p99 {mp['health']['p99_ms']:.0f} ms")
        ax2.legend(fontsize=8)
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
        written.append(_save(plt, fig, out / "avalanche.png", "Avalanche"))

    mp = _ok(data.get("burst", {}).get("results", {})).get("mailpush")
    if mp:
        fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
        tl = mp["rss_timeline"]
        base = mp["rss_before_kb"]
        ax.plot([t for t, _ in tl], [(kb - base) for _, kb in tl], color=COLORS["mailpush"], lw=1,
                label="mailpush RSS above the RSS before the burst")
        ax.axhline(mp["bound_kb"], color="k", ls="--", lw=1,
                   label=f"the bound (issue #4) = {mp['bound_kb']:,.0f} KiB")
        if mp.get("answer_seconds"):
            ax.axvspan(0, mp["answer_seconds"] * 1e3, color="#ffdd99", alpha=0.3, label="first ping → last pong")
        ax.set(xlabel="ms since the burst started", ylabel="KiB",
               title=f"Burst: {mp['n']:,} connections send at once (RSS every 2 ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(plt, fig, out / "burst.png", "Burst"))

    mp = _ok(data.get("slow_consumers", {}).get("results", {})).get("mailpush")
    if mp:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=FIGSIZE, dpi=DPI)
        b, w, a = mp["baseline_rounds"], mp["rounds"], mp["alone_rounds"]
        nb = len(b)
        ax1.plot(range(1 - nb, 1), [r["rate"] for r in b], "o-", color="#7f7f7f", ms=3,
                 label=f"{mp['fast']:,} fast clients alone")
        ax1.plot([r["round"] for r in a], [r["rate"] for r in a], "o", color="#7f7f7f", ms=3)
        xs = range(1, len(w) + 1)
        ax1.plot(xs, [r["rate"] for r in w], "o-", color=COLORS["mailpush"], ms=3,
                 label=f"events to the {mp['stalled']:,} stalled clients too")
        ax1.axhline(0.9 * mp["baseline_rate"], color="k", ls="--", lw=1, label="90% of the median alone")
        if mp.get("all_dropped_round"):
            ax1.axvline(mp["all_dropped_round"], color="#2ca02c", ls=":", lw=1, label="all stalled dropped")
        ax1.set(xlabel="round (≤ 0: before the stalled clients connect)", ylabel="fast deliveries/s",
                title="Fast clients' rate per round")
        ax1.set_ylim(bottom=0)
        ax1.legend(fontsize=7)
        ax2.plot(xs, [(r["rss_kb"] or 0) / 1024 for r in w], "o-", color=COLORS["mailpush"], ms=3,
                 label="server RSS after the round")
        ref = max(mp["rss_baseline_peak_kb"], mp["rss_with_stalled_kb"])
        ax2.axhline(ref / 1024, color="#7f7f7f", ls=":", lw=1, label="before: peak alone / idle with stalled")
        ax2.axhline((ref + mp["rss_bound_kb"]) / 1024, color="k", ls="--", lw=1,
                    label="+ stalled × --send-queue-bytes")
        if mp.get("all_dropped_round"):
            ax2.axvline(mp["all_dropped_round"], color="#2ca02c", ls=":", lw=1, label="all stalled dropped")
        ax2.set(xlabel="round", ylabel="MiB", title="Server RSS while the stalled clients fill up")
        ax2.legend(fontsize=7)
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
        written.append(_save(plt, fig, out / "slow_consumers.png", "Slow consumers"))

    mp = _ok(data.get("drain", {}).get("results", {})).get("mailpush")
    if mp:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=FIGSIZE, dpi=DPI)
        step, hist = mp["hist_step_s"], mp["hist"]
        ax1.bar([i * step for i in range(len(hist))], hist, width=step, align="edge",
                color=COLORS["mailpush"], edgecolor="white")
        ax1.axhline(mp["n"] / len(hist), color="k", ls="--", lw=1, label="even spread")
        ax1.set(xlabel="seconds after SIGTERM", ylabel="Close frames (1012)")
        ax1.set_title(f"{mp['n']:,} Close frames, --drain-seconds {mp['drain_seconds']:g}\n"
                      f"exit code {mp['exit_code']} after {mp['exit_seconds'] or float('nan'):.2f} s", fontsize=10)
        ax1.legend(fontsize=8)
        rstep, rh = mp["reconnect_hist_step_s"], mp["reconnect_hist"]
        ax2.bar([i * rstep for i in range(len(rh))], rh, width=rstep, align="edge", color="#1f77b4",
                edgecolor="white")
        ax2.set(xlabel=f"seconds after SIGTERM (last bar: ≥ {(len(rh) - 1) * rstep:g} s)", ylabel="clients")
        ax2.set_title("Suggested reconnect time\n(close + the delay in the reason)", fontsize=10)
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
        written.append(_save(plt, fig, out / "drain.png", "Drain"))
    return written


def verdicts(data: dict) -> list[str]:
    """The issues' targets judged in this run, one row each."""
    rows = []
    for name, sc in SCENARIOS.items():
        if sc.verdicts is None or name not in data:
            continue
        for v in sc.verdicts(data[name]["results"]):
            met = {True: "yes", False: "**no**", None: "–"}[v["met"]]
            rows.append(f"| {v['issue']} | {sc.title} | {v['target']} | {v['measured']} | {met} |")
    if not rows:
        return []
    return ["| issue | scenario | target | measured | met |", "|---|---|---|---|---|"] + rows


def summary(data: dict) -> list[str]:
    """DESIGN.md's table, from this run: memory, upgrades, fan-out per server."""
    mem = _ok(data.get("memory", {}).get("results", {}))
    upg = _ok(data.get("upgrade", {}).get("results", {}))
    fan = _ok(data.get("fanout", {}).get("results", {}))
    names = [n for n in SERVERS if n in mem or n in upg or n in fan]
    if not names:
        return []

    def kb(name):
        pts = mem.get(name, {}).get("points") or []
        return pts[-1]["kb_per_conn"] if pts else None

    def n_of(results, key="n"):
        return next((r[key] for r in results.values()), None)

    top = max((p["connections"] for r in mem.values() for p in r["points"]), default=None)
    cols = [("KiB per idle connection" + (f" @ {top:,}" if top else ""), kb, ".2f"),
            ("upgrades/s" + (f" @ {n_of(upg):,}" if upg else ""),
             lambda n: upg.get(n, {}).get("rate_median"), ",.0f"),
            ("fan-out deliveries/s" + (f" @ {n_of(fan):,}" if fan else ""),
             lambda n: fan.get(n, {}).get("rate_median"), ",.0f")]
    head = ["server"]
    for title, _, _ in cols:
        head += [title, "× mailpush", "× floor"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        cells = [_label(name)]
        for _, get, fmt in cols:
            v, mp, fl = get(name), get("mailpush"), get("floor")
            cells += [format(v, fmt) if v is not None else "–",
                      f"{v / mp:.2f}×" if v and mp else "–", f"{v / fl:.2f}×" if v and fl else "–"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def cpu_summary(data: dict) -> list[str]:
    """Server CPU per operation, user and system time apart, per server:
    over loopback most of a delivery is the kernel's, so rates hide what a
    server's own code costs; its user time shows it."""
    cols = [("upgrade", "µs/upgrade", "server_user_us_per_upgrade", "server_sys_us_per_upgrade",
             "server_cpu_us_per_upgrade"),
            ("fanout", "µs/delivery, fan-out", "server_user_us_per_delivery", "server_sys_us_per_delivery",
             "server_cpu_us_per_delivery"),
            ("broadcast", "µs/delivery, broadcast", "server_user_us_per_delivery", "server_sys_us_per_delivery",
             "server_cpu_us_per_delivery")]
    res = {key: _ok(data.get(key, {}).get("results", {})) for key, *_ in cols}
    cols = [c for c in cols if res[c[0]]]
    names = [n for n in SERVERS if any(n in res[c[0]] for c in cols)]
    if not names:
        return []
    head = ["server"] + [f"{what}: user / sys (total)" for _, what, *_ in cols]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v):
        return "–" if v is None else f"{v:.1f}"

    for name in names:
        cells = [_label(name)]
        for key, _, u, sy, tot in cols:
            r = res[key].get(name)
            sup = f"; supervisor {f(r['supervisor_cpu_us_per_delivery'])}" if r and r.get("supervisor_cpu_us_per_delivery") else ""
            cells.append(f"{f(r.get(u))} / {f(r.get(sy))} ({f(r.get(tot))}{sup})" if r else "–")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _script(name: str) -> str:
    spec = SERVERS[name]
    return f"{spec.script}.mjs" if spec.runtime == "node" else f"{spec.script}.py"


def write(out: Path, md_path: Path, meta: dict) -> Path:
    """Render ``md_path`` (and the plots into ``out``) from ``out``'s JSON."""
    data = _load(out)
    images = dict((title, path) for title, path in plots(out, data))

    def img(title: str) -> list[str]:
        path = images.get(title)
        if not path:
            return []
        rel = os.path.relpath(path, md_path.parent)
        return ["", f"![{title}]({rel})"]

    lines = [
        "# mailpush benchmark results",
        "",
        f"Generated by `bench/run.py` on {meta['date']} (profile **{meta['profile']}**, "
        f"{meta['seconds'] / 60:.1f} minutes). Every number below was measured in that one run, "
        "on this machine, with the same load generator for every server.",
        "",
        f"Command: `{meta['command']}`" + (f" (what `{meta['make']}` runs)" if meta.get("make") else ""),
        "",
        "## Machine",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in meta["machine"].items()]
    pin = meta.get("pin")
    lines.append("- CPU placement: " + (
        f"servers pinned to CPU {', '.join(map(str, pin['server_cpus']))}, the load generator and the bench "
        f"process to CPU {', '.join(map(str, pin['loadgen_cpus']))} (`--pin`)" if pin else
        "not pinned (`--pin` not given): the scheduler placed servers and load generator"))
    if meta.get("repeat", 1) > 1:
        lines.append(f"- repetitions: every scenario {meta['repeat']} times per server, the servers in a rotated "
                     "order each time; tables show the median of the runs and their min–max")
    table = summary(data)
    cpu = cpu_summary(data)
    targets = verdicts(data)
    if table or targets or cpu:
        head = ["## Summary", ""]
        if table:
            head += table + ["", "Memory: lower is better; rates: higher is better. Details, method and plots below.", ""]
        if cpu:
            head += ["### Server CPU per operation", ""] + cpu + [
                "", "µs of the server's CPU per operation, user and system time apart (from /proc/PID/stat, "
                "summed over all rounds of a run), and the total (scheduler time, median of the rounds). "
                "Over loopback a delivery is mostly kernel time; the user time is the server's own code. "
                "With `--workers`, the total is the whole process tree and \"supervisor\" its share of it "
                "(the relay: offsets, history, and each worker's events).", ""]
        if targets:
            head += ["### Targets of the issues, as measured in this run", ""]
            if meta.get("profile") != "full":
                head += [f"A **{meta.get('profile')}** run, at smaller sizes than the issues name: "
                         "these verdicts are indicative only.", ""]
            head += targets + [""]
        lines = lines[:6] + head + lines[6:]
    lines += [
        "",
        "## Method",
        "",
        "- Load generator: `bench/loadgen.py`, "
        f"{meta['client']['procs_note']}; raw non-blocking sockets on one epoll per "
        "process, no task or object per socket; several 127.0.x.y source addresses; "
        "each connection upgrades with its own HS256 token, sends `{\"type\":\"subscribe\"}` "
        "and counts as open once the answer arrives.",
        "- Servers, each in a fresh process per scenario: "
        + "; ".join(f"**{_label(n)}**" + (f" ({_script(n)})" if SERVERS[n].script else
                                            " (`mailpush serve`, embedded bus, JWT auth)")
                    for n in SERVERS) + ".",
        "- Ratios: `× mailpush` is the server's value divided by mailpush's, `× floor` divided "
        "by the floor's (for memory, lower is better; for rates, higher is better).",
        "- Everything shares 2 cores over loopback: the clients' epoll loops run next to the "
        "server, and a loopback `send()` pays for the receiver's TCP work too, so absolute "
        "rates are below what separate client machines would show; the ratios are the point.",
        "- Reference servers send a 40-byte text payload; mailpush sends its real event frame "
        "(envelope with subscriber and event name), whose size is in the fan-out table. In the "
        "broadcast scenario every token names the same subscriber, and its one event has empty data, "
        "so mailpush sends one small prebuilt frame to all tabs.",
        "- Resource-control scenarios (mailpush only, issue 4) watch the server while loading it, "
        "from threads of the bench process (`bench/probes.py`): RSS from `/proc/PID/statm` every "
        "2–10 ms, `GET /metrics` on the admin port every 20–50 ms, and a load balancer's "
        "`GET /healthz` on the listen port (a fresh connection every 20 ms, each allowed 2 s).",
        "- Targets: each issue's target is judged against this run's numbers next to the table it "
        "comes from, and all of them are gathered in the summary. Only a full run measures at the "
        "sizes the issues name; quick and tiny runs judge the same targets at their smaller sizes, "
        "which is indicative only (the memory target, stated at 15,000 connections, is not judged "
        "below that).",
        "",
    ]
    for name, sc in SCENARIOS.items():
        if name not in data:
            continue
        d = data[name]
        lines += [f"## {sc.title}", ""]
        if sc.doc:
            lines += [" ".join(sc.doc.split()), ""]
        lines += sc.report(d["results"])
        lines += img({"memory": "Memory vs connections", "upgrade": "Upgrade rate",
                      "fanout": "Fan-out", "broadcast": "Broadcast", "latency": "Latency CDF",
                      "avalanche": "Avalanche", "burst": "Burst", "slow_consumers": "Slow consumers",
                      "drain": "Drain"}.get(name, ""))
        lines += ["", f"Raw numbers: `{os.path.relpath(out / f'{name}.json', md_path.parent)}`.", ""]
    if meta.get("notes"):
        lines += ["## Notes from this run", ""] + [f"- {n}" for n in meta["notes"]] + [""]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    md = Path(sys.argv[2]) if len(sys.argv) > 2 else out_dir / "RESULTS.md"
    meta_path = out_dir / "meta.json"
    write(out_dir, md, json.loads(meta_path.read_text()))
    print(md)
