"""tools/sanitize.py, which ``make test`` runs: its instrumented build
reports a memory error in the C code at the function that made it (a copy
of _speedups.c with a two-byte overflow planted in one_frame), and runs the
real code clean. Without PYTHONMALLOC=malloc in its environment the planted
overflow goes unreported (pymalloc's arenas hide it) and the second test
fails."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("sanitize", ROOT / "tools" / "sanitize.py")
assert _spec is not None and _spec.loader is not None
sanitize = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sanitize)

# One masked text frame, "hi" (mask 01 02 03 04): one_frame reads it.
SNIPPET = (
    "from mailpush.speedups import C\n"
    "print(C.one_frame(bytes([0x81, 0x82, 1, 2, 3, 4, ord('h') ^ 1, ord('i') ^ 2]), 100))\n"
)
# one_frame's unmasking loop, as it is in the source.
LOOP = "for (Py_ssize_t i = 0; i < length; i++) w[i] = d[6 + i] ^ mask[i & 3];"


def _run(tmp_path: Path, source: Path) -> subprocess.CompletedProcess[str]:
    src = tmp_path / "src"
    sanitize.build("gcc", "address,undefined", src, source)
    env = sanitize.sanitized_env(src, sanitize.gcc_runtime())
    return subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, timeout=120)


def test_the_instrumented_build_runs_the_c_code_clean(tmp_path):
    r = _run(tmp_path, sanitize.SOURCE)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(1, b'hi')"


def test_an_overflow_in_the_c_code_is_reported(tmp_path):
    text = sanitize.SOURCE.read_text()
    assert LOOP in text, "one_frame's loop changed: update LOOP"
    broken = tmp_path / "_speedups.c"
    broken.write_text(text.replace(LOOP, LOOP.replace("i < length;", "i < length + 2;")))
    r = _run(tmp_path, broken)
    assert r.returncode != 0, r.stdout
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in r.stderr, r.stderr[-3000:]
    assert "py_one_frame" in r.stderr
