"""The bench must not rot: run every scenario at a tiny scale, check the numbers.

``bench/run.py --tiny`` opens 50 connections per server and runs the
memory, upgrade, fan-out and latency scenarios once each, writing its JSON,
plots and RESULTS.md into a temporary directory (never over bench/results).
This test does not judge performance; it checks that every connection
upgraded and every delivery arrived, for every server, so a change in
mailpush's contract or in the bench breaks here rather than in a release's
`make bench`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "bench" / "run.py"

# The tiny run takes ~20 s on the 2-core dev machines (13 server starts);
# 150 s means something hangs, and the run's own deadlines should fire first.
TIMEOUT_S = 150

# Connections per server in the tiny profile (bench/scenarios.py PROFILES).
TINY_N = 50

SCENARIOS = ("memory", "upgrade", "fanout", "latency")
REFERENCE_SERVERS = ("triows", "websockets", "floor")


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
    servers = REFERENCE_SERVERS + (("mailpush",) if mailpush_ready else ())

    memory = _results(tmp_path, "memory")
    upgrade = _results(tmp_path, "upgrade")
    fanout = _results(tmp_path, "fanout")
    for name in servers:
        m = memory[name]
        assert "error" not in m and "skipped" not in m, (name, m)
        (point,) = m["points"]
        assert point["connections"] == point["still_open"] == TINY_N, (name, point)
        assert point["rss_kb"] > 0 and point["kb_per_conn"] is not None

        u = upgrade[name]
        assert u["ok_min"] == TINY_N and u["failed"] == 0, (name, u)
        assert u["rate_median"] > 0

        f = fanout[name]
        assert f["missing"] == 0, (name, f)
        assert all(r["delivered"] == r["expected"] == TINY_N for r in f["rounds"]), (name, f["rounds"])
        assert f["rate_median"] > 0
        assert not f["client_stats"]["errors"], (name, f["client_stats"])

    latency = _results(tmp_path, "latency")
    for name in ("floor",) + (("mailpush",) if mailpush_ready else ()):
        lat = latency[name]
        assert "error" not in lat, (name, lat)
        assert lat["runs"], name
        for b in lat["runs"]:
            assert b["lost"] == 0 and b["samples"] > 0, (name, b)
            assert 0 < b["p50_ms"] <= b["p99_ms"] <= b["max_ms"], (name, b)

    report = (tmp_path / "RESULTS.md").read_text()
    for heading in ("Idle memory", "Upgrade rate", "Fan-out", "## Machine"):
        assert heading in report
    for png in ("memory.png", "upgrade.png", "fanout.png"):
        assert (tmp_path / png).stat().st_size > 0, png
    assert (tmp_path / "latency_cdf.png").stat().st_size > 0
