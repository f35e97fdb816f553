"""RFC 6455 conformance: the independent runner ``kosoku`` (the Autobahn
Testsuite cases) drives the server's test echo endpoint.

Excluded, as in the issue: 9.* (performance: messages up to 16 MiB, minutes
of runtime), 12.* and 13.* (permessage-deflate, which mailpush does not
negotiate). That leaves 247 cases, about 9 s on these machines.

"Pass" is Autobahn's: behaviour OK, NON-STRICT or INFORMATIONAL, and the
closing behaviour OK or INFORMATIONAL. Today 12 cases are NON-STRICT, all
for one reason each (see tests/test_frames.py, difference 6, and the UTF-8
fail-fast note): 3.2-3.4, 4.1.3-4.1.5, 4.2.3-4.2.5, 5.15 (an echo that
shares a TCP segment with the violating frame is not sent), 6.4.3-6.4.4
(invalid UTF-8 in the middle of a frame is found when the frame is
complete, not at the bad byte).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SECRET

KOSOKU = Path(sys.executable).parent / "kosoku"
EXPECTED_CASES = 247
# kosoku alone took ~9 s here; generous for a loaded 2-core machine.
RUN_TIMEOUT = 180
START_TIMEOUT = 20

PASSING = {"OK", "NON-STRICT", "INFORMATIONAL"}
PASSING_CLOSE = {"OK", "INFORMATIONAL"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, port: int, log: Path) -> None:
    # conftest.server_process waits for the info-level "listening" log line,
    # which --log-level warning suppresses; so ask /healthz instead.
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text(errors='replace')[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                if s.recv(100).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not become healthy")


@pytest.mark.parametrize("poller", ["task", "shared"])
def test_kosoku_fuzzingclient_passes_all_cases(tmp_path, poller) -> None:
    assert KOSOKU.exists(), f"kosoku is not installed next to {sys.executable} (pip install -e '.[test]')"
    port = _free_port()
    cmd = [
        sys.executable, "-m", "mailpush", "serve",
        "--listen", f"127.0.0.1:{port}", "--admin", "off", "--secret", SECRET,
        "--echo-path", "/echo", "--max-message-size", "16777216", "--send-queue-bytes", "67108864",
        "--log-level", "warning", "--log-format", "json", "--poller", poller,
    ]  # fmt: skip
    log_path = tmp_path / "server.log"
    log = log_path.open("wb")
    # Into a file, not a pipe: nobody has to keep reading it during the run.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(proc, port, log_path)
        report = tmp_path / "report"
        run = subprocess.run(
            [str(KOSOKU), "-m", "fuzzingclient", f"ws://127.0.0.1:{port}/echo", "-x", "9.*", "-x", "12.*", "-x", "13.*", "-o", str(report)],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
        )
        assert proc.poll() is None, "the server died during the run"
    finally:
        proc.kill()
        proc.wait(10)
        log.close()
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]

    index = json.loads((report / "index.json").read_text())
    assert len(index) == 1, index.keys()
    cases = next(iter(index.values()))
    failed = {
        case: (r["behavior"], r["behaviorClose"])
        for case, r in cases.items()
        if r["behavior"] not in PASSING or r["behaviorClose"] not in PASSING_CLOSE
    }
    assert not failed, f"failed cases: {failed}"
    assert len(cases) == EXPECTED_CASES, sorted(cases)
    assert f"{EXPECTED_CASES} cases passed" in output, output[-3000:]
    non_strict = sorted(c for c, r in cases.items() if r["behavior"] == "NON-STRICT")
    # No connection may have ended in an unexpected exception on the way.
    server_log = log_path.read_text(errors="replace")
    for bad in ("connection_failed", "writer_failed", "Traceback"):
        assert bad not in server_log, server_log[-3000:]
    print(f"kosoku: {len(cases)} cases passed, NON-STRICT: {', '.join(non_strict)}")
