"""Smoke test of the coverage-guided fuzzing (fuzz/run.py, ``make fuzz``).

Every target runs for a couple of seconds through fuzz/run.py, on a copy of
the committed corpus and of the saved crashes (so a crash saved under
fuzz/crashes/ fails its target here until it is fixed, and the repository's
files are not touched): each must execute inputs and report no crash.

And the harness must not be able to pass silently: with each target's
parser made to raise a foreign error (ValueError), the target's check lets
it through, the harness records it as a crash (or re-raises it for
libFuzzer), and a whole run.py run on a target that crashes exits nonzero
with the crash in its summary and its input saved.

About 30 s on two shared cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("atheris")

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
TARGETS_DIR = FUZZ / "targets"
RUN = FUZZ / "run.py"
SECONDS = 2
TARGETS = sorted(p.stem.removeprefix("fuzz_") for p in TARGETS_DIR.glob("fuzz_*.py"))

sys.path.insert(0, str(TARGETS_DIR))


def run_fuzz(tmp: Path, *args: str, timeout: float = 150) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp / "out.json"
    proc = subprocess.run(
        [sys.executable, str(RUN), "--out", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.exists(), proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    tmp = tmp_path_factory.mktemp("fuzz")
    for part in ("corpus", "crashes"):
        if (FUZZ / part).is_dir():
            shutil.copytree(FUZZ / part, tmp / part)
    return run_fuzz(
        tmp,
        "--seconds",
        str(SECONDS),
        "--jobs",
        "2",
        "--max-corpus",
        "0",
        "--corpus-root",
        str(tmp / "corpus"),
        "--crashes-root",
        str(tmp / "crashes"),
    )


def test_there_are_targets_for_every_parser() -> None:
    assert set(TARGETS) >= {"handshake", "frames", "packets", "items", "bus_item", "resp", "admin_http"}


@pytest.mark.parametrize("name", TARGETS)
def test_each_target_runs_without_a_crash(short_run, name: str) -> None:
    proc, summary = short_run
    result = summary["targets"][name]
    assert result["executions"] > 0, result.get("output_tail", proc.stdout)
    crashes = [f"{c['signature']}: {c['error']} (input {c['path']})" for c in result["crash_list"]]
    assert result["crashes"] == 0, "\n".join(crashes)


# -- the harness cannot pass silently ------------------------------------------------------------


def _modules():
    import _harness
    import fuzz_admin_http
    import fuzz_auth
    import fuzz_bus_item
    import fuzz_frames
    import fuzz_handshake
    import fuzz_items
    import fuzz_packets
    import fuzz_resp

    return _harness, {
        # target: (module, object holding the parser, its attribute)
        "handshake": (fuzz_handshake, fuzz_handshake.hs, "parse_request"),
        "frames": (fuzz_frames, fuzz_frames.Decoder, "feed"),
        "packets": (fuzz_packets, fuzz_packets, "parse_client_packet"),
        "items": (fuzz_items, fuzz_items, "parse_items"),
        "bus_item": (fuzz_bus_item, fuzz_bus_item, "parse_item_json"),
        "resp": (fuzz_resp, fuzz_resp.PushParser, "feed"),
        "admin_http": (fuzz_admin_http, fuzz_admin_http, "parse_requests"),
        "auth": (fuzz_auth, type(fuzz_auth.VERIFIER), "verify"),
    }


@pytest.mark.parametrize("name", TARGETS)
def test_a_foreign_error_from_the_parser_is_a_crash(name: str, monkeypatch, tmp_path) -> None:
    harness, modules = _modules()
    module, holder, attr = modules[name]

    def broken(*args, **kwargs):
        raise ValueError("not the parser's own error")

    seed = next(iter(module.SEEDS.values()))
    module.check(seed)  # the real parser: no crash on a seed
    monkeypatch.setattr(holder, attr, broken)
    with pytest.raises(ValueError):
        module.check(seed)
    # Run by hand / by libFuzzer: re-raised.
    with pytest.raises(ValueError):
        harness.Guard(name, module.check)(seed)
    # Run by run.py: recorded, with its input and traceback, and fuzzing goes on.
    log = tmp_path / "log.jsonl"
    guard = harness.Guard(name, module.check, crash_dir=str(tmp_path), keep_going=True, log_path=str(log))
    guard(seed)
    guard(seed + b"more")
    [(signature, (data, count))] = guard.crashes.items()
    assert signature.startswith("ValueError") and data == seed and count == 2
    [line] = log.read_text().splitlines()
    saved = tmp_path / json.loads(line)["file"]
    assert saved.read_bytes() == seed
    assert "ValueError: not the parser's own error" in saved.with_name(saved.name + ".txt").read_text()


def test_the_parsers_own_error_is_not_a_crash(monkeypatch) -> None:
    harness, modules = _modules()
    module = modules["packets"][0]
    from mailpush.errors import PacketError

    def refuses(text):
        raise PacketError("bad_json", "refused")

    monkeypatch.setattr(module, "parse_client_packet", refuses)
    guard = harness.Guard("packets", module.check, keep_going=True)
    guard(b"{}")
    assert guard.crashes == {}


def test_a_crashing_target_fails_the_run(tmp_path) -> None:
    # End to end through run.py: a target whose parser raises ValueError on
    # one of its seeds; the run must say so, exit 1 and save the input.
    targets = tmp_path / "targets"
    targets.mkdir()
    (targets / "fuzz_canary.py").write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(TARGETS_DIR)!r})
            from _harness import main

            NAME, MAX_LEN = "canary", 64
            SEEDS = {{"ok": b"abc", "boom": b"xyz"}}

            def check(data):
                if data[:1] == b"x":
                    raise ValueError("canary")

            if __name__ == "__main__":
                main(NAME, check, __file__, MAX_LEN, SEEDS)
            """
        )
    )
    proc, summary = run_fuzz(
        tmp_path,
        "--seconds",
        "1",
        "--targets-dir",
        str(targets),
        "--corpus-root",
        str(tmp_path / "corpus"),
        "--crashes-root",
        str(tmp_path / "crashes"),
        timeout=60,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    result = summary["targets"]["canary"]
    assert result["executions"] > 0 and result["crashes"] == 1, result
    [crash] = result["crash_list"]
    assert crash["signature"].startswith("ValueError") and not crash["known"]
    assert (tmp_path / "crashes" / "canary" / crash["file"]).read_bytes()[:1] == b"x"
    assert "canary" in proc.stdout and "FAILED" in proc.stdout
    assert sorted(os.listdir(tmp_path / "corpus" / "canary"))[:2] == ["seed-boom", "seed-ok"]
