"""mailpush's C extension (src/mailpush/_speedups.c) under AddressSanitizer
and UndefinedBehaviorSanitizer: it reads bytes from hostile clients (the
upgrade request, single frames) and publishers, so an out-of-bounds read, a
use after free or an overflow there is a remote crash.

Two modes, each on a copy of ``src/`` in a temporary folder whose extension
is built instrumented (the venv's own build is left alone)::

    .venv/bin/python tools/sanitize.py test        # part of `make test`
    .venv/bin/python tools/sanitize.py fuzz -- --seconds 120 --only frames

``test`` builds it with gcc and runs the tests that drive every C function
(their differential and leak tests included), with gcc's ASan runtime
preloaded into the interpreter. ``fuzz`` builds it with clang (installed
from Debian when missing) with libFuzzer's edge coverage too, and runs
``fuzz/run.py`` (the arguments after ``--``) with atheris' ASan runtime
preloaded: the fuzzer is then guided into the C code as well. Any sanitizer
report stops the process with an error; the exit code says whether all
passed. Leak detection is off: the interpreter keeps its own allocations
until exit (``tests/test_speedups.py`` checks the C code's references).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src" / "mailpush" / "_speedups.c"
# The tests that run every C function: their twins' differential tests, the
# delivery scenario on real sockets, the leak tests, the dispatcher's and
# the recovery's suites (each run with the C loop and the Python loop), and
# the accept on bare descriptors (the C accept4 beside the ctypes one).
TESTS = [
    "tests/test_speedups.py",
    "tests/test_dispatch.py",
    "tests/test_recovery.py",
    "tests/test_handshake.py",
    "tests/test_frames.py",
    "tests/test_history.py",
    "tests/test_properties.py",
    "tests/test_rawsock.py",
]
FLAGS = ["-shared", "-fPIC", "-O1", "-g", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]
ENV = {
    # Every Python object from malloc, not from pymalloc's arenas: else a
    # write past the end of a bytes object the C code fills corrupts its
    # neighbour in the arena, unseen, and the process crashes later
    # somewhere else (tried: a planted overflow in one_frame).
    "PYTHONMALLOC": "malloc",
    # Leaks: see the module docstring. A report ends the process (exit 1).
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:halt_on_error=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}


def fail(message: str) -> None:
    print(f"sanitize: {message}", file=sys.stderr)
    sys.exit(2)


def build(compiler: str, sanitizers: str, into: Path, source: Path = SOURCE) -> None:
    """A copy of src/ in ``into`` whose extension is built instrumented
    (from ``source``: the tests build a broken one on purpose)."""
    if not shutil.which(compiler):
        fail(f"{compiler} is not installed: apt-get install {compiler}")
    shutil.copytree(ROOT / "src", into, ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info"))
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    include = sysconfig.get_paths()["include"]
    out = into / "mailpush" / f"_speedups{suffix}"
    cmd = [compiler, *FLAGS, f"-fsanitize={sanitizers}", f"-I{include}", str(source), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        fail(f"building the instrumented extension failed:\n{' '.join(cmd)}\n{r.stderr}")


# Run in the sanitized interpreter before anything else: the extension is the
# instrumented copy and the sanitizer runtime is in the process, or this is
# not the run it claims to be.
CHECK = """
import sys, mailpush._speedups as m
if not m.__file__.startswith(sys.argv[1]):
    sys.exit(f"loaded {m.__file__}, not the instrumented build in {sys.argv[1]}")
maps = open("/proc/self/maps").read()
if "asan" not in maps:
    sys.exit("no AddressSanitizer runtime in the process")
from mailpush.speedups import C
if C is not m:
    sys.exit("mailpush.speedups did not take the extension")
"""


def sanitized_env(src: Path, preload: str) -> dict[str, str]:
    """The environment of an interpreter that loads the instrumented copy."""
    env = dict(os.environ, PYTHONPATH=str(src), LD_PRELOAD=preload, **ENV)
    env.pop("MAILPUSH_SPEEDUPS", None)
    return env


def run(cmd: list[str], src: Path, preload: str) -> int:
    env = sanitized_env(src, preload)
    check = subprocess.run([sys.executable, "-c", CHECK, str(src)], env=env)
    if check.returncode:
        fail("the instrumented extension is not the one loaded (see above)")
    return subprocess.run(cmd, env=env, cwd=ROOT).returncode


def gcc_runtime() -> str:
    path = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        fail("gcc's AddressSanitizer runtime (libasan) is not installed: apt-get install gcc")
    return os.path.realpath(path)


def atheris_runtime() -> str:
    try:
        import atheris
    except ImportError:
        fail("atheris is not installed: make venv (the [fuzz] extra)")
    path = os.path.join(atheris.path(), "asan_with_fuzzer.so")
    if not os.path.exists(path):
        fail(f"atheris has no {path}")
    return path


def ensure_clang() -> None:
    if shutil.which("clang"):
        return
    print("sanitize: installing clang (the fuzz mode's compiler)", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "clang"]):
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode:
            fail("clang is not installed and apt-get could not install it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("test", "fuzz"))
    parser.add_argument("rest", nargs="*", help="test: pytest arguments; fuzz: fuzz/run.py arguments (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mailpush-sanitize-") as tmp:
        src = Path(tmp) / "src"
        if args.mode == "test":
            build("gcc", "address,undefined", src)
            # --capture=sys: a sanitizer's report (written to descriptor 2
            # as the process dies) is not swallowed by pytest's capture.
            cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--capture=sys", *TESTS, *args.rest]
            rc = run(cmd, src, gcc_runtime())
        else:
            ensure_clang()
            build("clang", "address,undefined,fuzzer-no-link", src)
            rc = run([sys.executable, str(ROOT / "fuzz" / "run.py"), *args.rest], src, atheris_runtime())
    if rc:
        print(f"sanitize: {args.mode} failed (exit {rc}); a sanitizer report is above, if any", file=sys.stderr)
    sys.exit(rc)


if __name__ == "__main__":
    main()
