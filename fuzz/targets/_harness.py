"""What every fuzz target shares: the crash rule, crash records, and the
entry point that hands a target to atheris.

The rule for every parser: whatever the input, it returns or raises its own
error class (:mod:`mailpush.errors`). A target's ``check(data)`` drives the
parser and lets anything else propagate: a foreign exception from the
parser (RecursionError, ValueError, IndexError, UnicodeError, ...) or a
:class:`Violation` of a property the target checks on top (the same result
however the bytes are split, bounds on what is returned). Both are crashes.

:class:`Guard` wraps ``check`` for libFuzzer. Run by ``fuzz/run.py``
(``MAILPUSH_FUZZ_KEEP_GOING=1``) it records each crash and keeps fuzzing, so
one known bug does not blind the target for the rest of its run: one input
file per distinct crash signature (exception type and the innermost frame
in mailpush, or the check that failed), kept at the smallest input seen,
with a ``.txt`` beside it (signature, traceback, input). Run by hand on a
file (``python fuzz/targets/fuzz_packets.py fuzz/crashes/packets/crash-…``)
it re-raises, and libFuzzer prints the traceback and exits nonzero.

Hangs and memory blow-ups are libFuzzer's: ``-timeout`` and
``-rss_limit_mb`` write ``timeout-…``/``oom-…`` files to the artifact
prefix (``fuzz/crashes/<target>/``).

This module imports nothing from mailpush, so a target can import it
before its instrumented imports.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import sys
import traceback
import zlib
from collections.abc import Callable

__all__ = ["Violation", "expect", "own", "pieces", "rng_for", "split_points", "Guard", "write_seeds", "main"]

# Environment run.py sets for a fuzzing child.
ENV_KEEP_GOING = "MAILPUSH_FUZZ_KEEP_GOING"  # "1": record crashes and go on
ENV_CRASH_DIR = "MAILPUSH_FUZZ_CRASH_DIR"  # where crash inputs and their .txt go
ENV_CRASH_LOG = "MAILPUSH_FUZZ_CRASH_LOG"  # JSON lines, one per distinct crash seen by this process
ENV_SEEDS_TO = "MAILPUSH_FUZZ_SEEDS_TO"  # a corpus dir: write the target's seeds there first

_SELF = os.path.abspath(__file__)


class Violation(AssertionError):
    """A property a target checks on top of the error rule does not hold."""


def expect(condition: object, what: str) -> None:
    """Raise :class:`Violation` saying ``what`` unless ``condition`` holds
    (an ``assert`` that ``python -O`` cannot strip)."""
    if not condition:
        raise Violation(what)


def own(errors: type[BaseException] | tuple[type[BaseException], ...], fn: Callable, *args):
    """``(result, None)`` or ``(None, the parser's own error)``; any other
    exception propagates (a crash)."""
    try:
        return fn(*args), None
    except errors as e:
        return None, e


def rng_for(data: bytes) -> random.Random:
    """A generator seeded by the input: the same input is always split the
    same way, so a crash reproduces from its file alone."""
    return random.Random(zlib.crc32(data))


def split_points(rng: random.Random, length: int, max_cuts: int = 8) -> list[int]:
    """Up to ``max_cuts`` cut positions in ``0..length``."""
    return [rng.randint(0, length) for _ in range(rng.randint(1, max_cuts))]


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at ``cuts`` (each taken modulo ``len(data) + 1``)."""
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


# -- crashes ----------------------------------------------------------------------------------


def _where(frame: traceback.FrameSummary) -> str:
    path = frame.filename
    for marker in ("/src/mailpush/", "/site-packages/", "/fuzz/"):
        i = path.rfind(marker)
        if i >= 0:
            path = path[i + 1 :]
            break
    return f"{path}:{frame.lineno} in {frame.name}"


def signature(exc: BaseException) -> str:
    """What identifies a bug: the exception type and where it was raised,
    the innermost frame in mailpush (for a violation: the check that
    failed), and the innermost frame overall when that is elsewhere."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != _SELF]
    if not frames:
        return type(exc).__name__
    ours = [f for f in frames if "/mailpush/" in f.filename] if not isinstance(exc, Violation) else []
    anchor = ours[-1] if ours else frames[-1]
    sig = f"{type(exc).__name__} at {_where(anchor)}"
    if anchor is not frames[-1]:
        sig += f" (raised at {_where(frames[-1])})"
    return sig


class Guard:
    """The function libFuzzer calls: ``check(data)``, with crashes recorded.

    Args:
      target: the target's name (for the records).
      check: the target's check; returns or raises.
      crash_dir: where crash inputs are written; None: only kept in
        :attr:`crashes`.
      keep_going: record and go on (True), or re-raise after recording
        (False: libFuzzer stops and writes its own ``crash-…`` file).
      log_path: a JSON-lines file; a line per distinct crash seen here.
    """

    def __init__(
        self,
        target: str,
        check: Callable[[bytes], object],
        crash_dir: str | None = None,
        keep_going: bool = False,
        log_path: str | None = None,
    ) -> None:
        self.target = target
        self.check = check
        self.crash_dir = crash_dir
        self.keep_going = keep_going
        self.log_path = log_path
        # signature -> (smallest input so far, how many inputs crashed so)
        self.crashes: dict[str, list] = {}

    def __call__(self, data: bytes) -> None:
        try:
            self.check(data)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # anything escaping check is the finding we look for
            self.record(data, exc)
            if not self.keep_going:
                raise

    def record(self, data: bytes, exc: BaseException) -> None:
        sig = signature(exc)
        seen = self.crashes.get(sig)
        if seen is not None:
            seen[1] += 1
            if len(data) >= len(seen[0]):
                return
            seen[0] = data
        else:
            self.crashes[sig] = [data, 1]
        name = "bug-" + hashlib.sha1(sig.encode()).hexdigest()[:16]
        if self.crash_dir is not None:
            self._write(name, sig, data, exc)
        if seen is None and self.log_path is not None:
            line = {"target": self.target, "signature": sig, "file": name, "error": _short(exc)}
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")

    def _write(self, name: str, sig: str, data: bytes, exc: BaseException) -> None:
        os.makedirs(self.crash_dir, exist_ok=True)
        path = os.path.join(self.crash_dir, name)
        old = _read(path)
        if old is not None and len(old) <= len(data):
            return  # an earlier run kept a smaller input of the same crash
        _atomic_write(path, data)
        tb = "".join(traceback.format_exception(exc))
        script = os.path.join("fuzz", "targets", f"fuzz_{self.target}.py")
        text = (
            f"target:    {self.target}\n"
            f"signature: {sig}\n"
            f"error:     {_short(exc)}\n"
            f"input:     {len(data)} bytes, in the file {name} beside this one\n"
            f"reproduce: .venv/bin/python {script} {os.path.join('fuzz', 'crashes', self.target, name)}\n\n"
            f"{tb}\n"
            f"input (repr, first 2000 bytes):\n{data[:2000]!r}\n"
        )
        _atomic_write(path + ".txt", text.encode("utf-8"))


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# -- the entry point ---------------------------------------------------------------------------


def write_seeds(directory: str, seeds: dict[str, bytes]) -> None:
    """Write each seed as ``seed-<name>`` into ``directory`` unless there."""
    os.makedirs(directory, exist_ok=True)
    for name, data in seeds.items():
        path = os.path.join(directory, f"seed-{name}")
        if _read(path) != data:
            _atomic_write(path, data)


def main(target: str, check: Callable[[bytes], object], script: str, max_len: int, seeds: dict[str, bytes]) -> None:
    """Fuzz ``check`` with libFuzzer's flags from the command line
    (``-max_len`` defaults to ``max_len``)."""
    import atheris

    env = os.environ
    if env.get(ENV_SEEDS_TO):
        write_seeds(env[ENV_SEEDS_TO], seeds)
    guard = Guard(
        target,
        check,
        crash_dir=env.get(ENV_CRASH_DIR) or None,
        keep_going=env.get(ENV_KEEP_GOING) == "1",
        log_path=env.get(ENV_CRASH_LOG) or None,
    )
    args = sys.argv[1:]
    if not any(a.startswith("-max_len=") for a in args):
        args.insert(0, f"-max_len={max_len}")
    # libFuzzer re-runs argv[0] through the shell for -merge and -fork: make
    # it the whole command (the script itself is not executable).
    argv = [shlex.join([sys.executable, os.path.abspath(script)]), *args]
    atheris.Setup(argv, guard)
    atheris.Fuzz()
