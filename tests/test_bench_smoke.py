"""The bench must not rot: run every scenario at a tiny scale, check the numbers.

``bench/run.py --tiny`` opens 50 connections per server and runs every
scenario once (memory, upgrade, fan-out, broadcast, latency, and the
resource-control ones on mailpush: avalanche, burst, slow consumers,
drain), writing its JSON, plots and RESULTS.md into a temporary directory
(never over bench/results). This test does not judge performance; it
checks that every connection upgraded and every delivery arrived, for every
server, and that the resource-control scenarios saw what they exist to see
(refusals at the limit, an answer per packet, stalled clients dropped,
1012 closes and exit 0), so a change in mailpush's contract or in the bench
breaks here rather than in a release's `make bench`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "bench" / "run.py"

# The tiny run takes ~35 s on the 2-core dev machines (~40 server starts, a
# 1 s drain, ~10 slow-consumer rounds); 150 s means something hangs, and
# the run's own deadlines should fire first.
TIMEOUT_S = 150

# Connections per server in the tiny profile (bench/scenarios.py PROFILES).
TINY_N = 50

SCENARIOS = ("memory", "upgrade", "fanout", "broadcast", "latency", "avalanche", "burst", "slow_consumers", "drain")
REFERENCE_SERVERS = ("triows", "websockets", "floor")
# DESIGN.md's peers: run when their library is installed, else reported as
# skipped with the reason, never a failure.
OPTIONAL_PEERS = ("picows", "node_ws", "socketify")
# The tiny profile's resource-control sizes (bench/scenarios.py PROFILES).
TINY_AVALANCHE_CLIENTS, TINY_AVALANCHE_LIMIT = 60, 50
TINY_FAST, TINY_STALLED = 45, 5


def _results(out: Path, scenario: str) -> dict:
    path = out / f"{scenario}.json"
    assert path.exists(), f"{scenario}.json was not written"
    data = json.loads(path.read_text())
    assert data["profile"]["name"] == "tiny"
    return data["results"]


def test_bench_tiny(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(RUN), "--tiny", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"run.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"

    mailpush_ready = (ROOT / "src" / "mailpush" / "server.py").exists()
    memory = _results(tmp_path, "memory")
    upgrade = _results(tmp_path, "upgrade")
    fanout = _results(tmp_path, "fanout")
    broadcast = _results(tmp_path, "broadcast")
    peers = []
    for name in OPTIONAL_PEERS:
        for scenario in (memory, upgrade, fanout, broadcast):
            assert "error" not in scenario[name], (name, scenario[name])
        if "skipped" in memory[name]:
            assert memory[name]["skipped"], name  # with its reason
        else:
            peers.append(name)
    servers = REFERENCE_SERVERS + tuple(peers) + (("mailpush",) if mailpush_ready else ())
    for name in servers:
        m = memory[name]
        assert "error" not in m and "skipped" not in m, (name, m)
        (point,) = m["points"]
        assert point["connections"] == point["still_open"] == TINY_N, (name, point)
        assert point["rss_kb"] > 0 and point["kb_per_conn"] is not None

        u = upgrade[name]
        assert u["ok_min"] == TINY_N and u["failed"] == 0, (name, u)
        assert u["rate_median"] > 0
        assert u["server_user_us_per_upgrade"] is not None and u["server_sys_us_per_upgrade"] is not None

        f = fanout[name]
        assert f["missing"] == 0, (name, f)
        assert all(r["delivered"] == r["expected"] == TINY_N for r in f["rounds"]), (name, f["rounds"])
        assert f["rate_median"] > 0
        assert not f["client_stats"]["errors"], (name, f["client_stats"])
        assert all(r["server_user_s"] >= 0 and r["server_sys_s"] >= 0 for r in f["rounds"]), name
        assert f["server_user_us_per_delivery"] is not None, name

    latency = _results(tmp_path, "latency")
    for name in ("floor",) + (("mailpush",) if mailpush_ready else ()):
        lat = latency[name]
        assert "error" not in lat, (name, lat)
        assert lat["runs"], name
        for b in lat["runs"]:
            assert b["lost"] == 0 and b["samples"] > 0, (name, b)
            assert 0 < b["p50_ms"] <= b["p99_ms"] <= b["max_ms"], (name, b)

    for name in ("floor",) + tuple(peers) + (("mailpush",) if mailpush_ready else ()):
        b = broadcast[name]
        assert "error" not in b and "skipped" not in b, (name, b)
        assert b["missing"] == 0 and b["every_connection_served"], (name, b["rounds"])
        assert all(r["delivered"] == r["expected"] == TINY_N for r in b["rounds"]), (name, b["rounds"])
    if mailpush_ready:
        # One subscriber, one small frame (the event and its offset) for all its tabs.
        assert broadcast["mailpush"]["subscribers"] == 1
        assert broadcast["mailpush"]["frame_bytes"] < 80, broadcast["mailpush"]["frame_bytes"]  # with its offset
        _check_resource_control(tmp_path)

    report = (tmp_path / "RESULTS.md").read_text()
    for heading in ("Idle memory", "Upgrade rate", "Fan-out", "Broadcast", "## Machine"):
        assert heading in report
    for png in ("memory.png", "upgrade.png", "fanout.png", "broadcast.png"):
        assert (tmp_path / png).stat().st_size > 0, png
    assert (tmp_path / "latency_cdf.png").stat().st_size > 0
    if mailpush_ready:
        for heading in ("Connection avalanche", "Burst", "Slow consumers", "Graceful drain",
                        "Targets of the issues"):
            assert heading in report, heading
        for png in ("avalanche.png", "burst.png", "slow_consumers.png", "drain.png"):
            assert (tmp_path / png).stat().st_size > 0, png


def _check_resource_control(out: Path) -> None:
    """What each resource-control scenario exists to see, at a tiny scale."""
    av = _results(out, "avalanche")["mailpush"]
    assert "error" not in av, av
    outcomes = {k: v["count"] for k, v in av["outcomes"].items()}
    assert sum(outcomes.values()) == TINY_AVALANCHE_CLIENTS, outcomes
    assert 0 < outcomes.get("upgrade", 0) <= TINY_AVALANCHE_LIMIT, outcomes
    refused = outcomes.get("503", 0) + outcomes.get("reset/refused", 0)
    assert refused >= TINY_AVALANCHE_CLIENTS - TINY_AVALANCHE_LIMIT, outcomes
    assert "timeout" not in outcomes and "other" not in outcomes, av["errors"]
    assert av["peak"]["mailpush_sockets"] is not None and av["peak"]["mailpush_sockets"] <= TINY_AVALANCHE_LIMIT
    assert av["final"]["mailpush_connections"] == outcomes["upgrade"] == av["client_open_after"]
    timeline = av["health"]["timeline"]
    assert timeline and all(o in ("200", "503") for _, _, o in timeline), timeline

    burst = _results(out, "burst")["mailpush"]
    assert "error" not in burst, burst
    assert burst["sent"] == burst["answers"] == burst["connections_answered"] == TINY_N, burst
    assert burst["rss_samples"] > 10 and not burst["client_errors"], burst

    slow = _results(out, "slow_consumers")["mailpush"]
    assert "error" not in slow, slow
    assert slow["slow_consumers_total"] == TINY_STALLED, slow["slow_consumers_total"]
    assert slow["all_dropped_round"] is not None
    assert slow["missing_fast"] == 0 and slow["fast_server_closed"] == 0, slow
    assert slow["fast_open_after"] == TINY_FAST
    probe = slow["stalled_probe"]
    assert probe["count"] == TINY_STALLED and "open" not in probe["outcomes"], probe

    drain = _results(out, "drain")["mailpush"]
    assert "error" not in drain, drain
    assert drain["exit_code"] == 0, drain
    assert drain["exit_seconds"] is not None and drain["exit_seconds"] <= drain["exit_limit_s"], drain
    assert drain["codes"] == {"1012": TINY_N}, drain["codes"]
    assert sum(drain["hist"]) + drain["after_window"] == TINY_N
    assert drain["delays_with_reason"] == TINY_N and drain["client_open_after"] == 0, drain


def _instructions():
    """bench/instructions.py as a module."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import instructions
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return instructions


def test_the_instruction_counts_program_runs_without_valgrind() -> None:
    """bench/instructions.py's fan-out program is the server's steps in one
    process; it runs under callgrind there, and here alone at a tiny size,
    so that a change to those steps' signatures breaks this test rather
    than the bench (it asserts that every tab got each publish's event).
    The count itself needs valgrind, which the suite does not install."""
    instructions = _instructions()
    subprocess.run([sys.executable, "-c", instructions._FANOUT, "20", "2", "3"], check=True, timeout=60)


def test_the_instruction_total_is_read_from_callgrind_output(tmp_path: Path) -> None:
    instructions = _instructions()
    out = tmp_path / "callgrind.out"
    out.write_text(
        "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nfl=x\nfn=f\n1 5\nsummary: 123456\ntotals: 123456\n"
    )
    assert instructions._total_ir(out) == 123456
    out.write_text("version: 1\nevents: Ir\n")
    with pytest.raises(RuntimeError, match="no instruction total"):
        instructions._total_ir(out)


@pytest.mark.parametrize("scenario", ["upgrade", "fanout", "broadcast"])
def test_the_a_b_program_runs_each_scenario_in_pairs(tmp_path: Path, scenario: str) -> None:
    """bench/ab.py at a tiny size against the floor (always there): one
    pair, every connection served, each side's numbers and the pairwise
    ratios written (a scenario whose results change shape breaks here)."""
    out = tmp_path / "ab.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ab.py"), "--against", "floor", "--scenario", scenario,
         "--n", str(TINY_N), "--rounds", "2", "--pairs", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, f"ab.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    data = json.loads(out.read_text())
    assert data["scenario"] == scenario and data["sides"] == {"A": "floor", "B": "mailpush_shared"}
    assert data["mailpush_commit"]  # which code was measured
    (pair,) = data["pairs"]
    for side in ("floor", "mailpush_shared"):
        assert set(pair[side]) == {"rate", "user_us", "sys_us", "cpu_us"}
        assert pair[side]["rate"] > 0 and pair[side]["cpu_us"] > 0
    assert data["pairwise_ratio_median"]["rate"] > 0
    assert "pairwise mailpush_shared/floor" in proc.stdout


def test_the_perf_report_is_read_into_user_and_kernel_shares() -> None:
    """bench/perf_profile.py's reading of ``perf report --sort dso,sym``
    (perf itself is not installed by the suite): shares of the samples,
    user and kernel apart, and each share of the CPU per operation."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import perf_profile
    finally:
        sys.path.remove(str(ROOT / "bench"))
    report = """# Samples: 40K of event 'cpu-clock'
#
# Overhead  Shared Object          Symbol
# ........  .....................  ..........
#
    60.00%  [kernel.kallsyms]      [k] tcp_sendmsg_locked
    15.00%  [kernel.kallsyms]      [k] do_syscall_64
    10.00%  libpython3.11.so.1.0   [.] unicodekeys_lookup_unicode
     5.00%  _speedups.cpython-311-x86_64-linux-gnu.so  [.] py_deliver_run
     5.00%  libpython3.11.so.1.0   [.] _PyObject_Malloc
     5.00%  libc.so.6              [.] __send


# (cmdline : perf report)
"""
    rows = perf_profile.parse_report(report)
    assert [(r["pct"], r["kernel"], r["sym"]) for r in rows][:3] == [
        (60.0, True, "tcp_sendmsg_locked"), (15.0, True, "do_syscall_64"), (10.0, False, "unicodekeys_lookup_unicode")]
    s = perf_profile.summarise(rows, cpu_us=20.0, top=2)
    assert s["user_pct"] == 25.0 and s["kernel_pct"] == 75.0
    assert s["user_us"] == 5.0 and s["kernel_us"] == 15.0
    assert [f["sym"] for f in s["user_functions"]] == ["unicodekeys_lookup_unicode", "py_deliver_run"]
    assert s["user_functions"][0]["of_user_pct"] == 40.0 and s["user_functions"][0]["us"] == 2.0
    assert s["user_objects"][0] == {"dso": "libpython3.11.so.1.0", "pct": 15.0, "us": 3.0}
    assert perf_profile.summarise(rows, cpu_us=None, top=1)["user_us"] is None
