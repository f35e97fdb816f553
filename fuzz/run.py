"""Coverage-guided fuzzing of every parser that reads bytes from outside
(``make fuzz``).

Each target is ``fuzz/targets/fuzz_<name>.py`` (its docstring says what it
checks); the rule for all of them: whatever the input, the parser returns
or raises its own error class, and anything else is a crash. This script
runs each target (or those named with ``--only``) for ``--seconds`` in its
own subprocess, under atheris (libFuzzer), one after the other (``--jobs``
runs several at once)::

    .venv/bin/python fuzz/run.py                      # every target, 60 s each
    .venv/bin/python fuzz/run.py --seconds 10 --only frames resp

and prints per target the executions, the seconds, the crashes, then
writes a JSON summary (``--out``; default ``bench/results/fuzz.json`` when
``bench/results`` exists, else ``fuzz/results.json``). The exit code is 1
if any target crashed (or its fuzzer failed), 0 otherwise.

Files (all in the repository, committed):

- ``fuzz/corpus/<name>/``: the corpus. ``seed-*`` files are the target's
  valid and near-valid inputs, taken from the tests (the ``SEEDS`` of the
  target module, written there when missing); libFuzzer adds the inputs that
  found new coverage, named by their SHA-1. Kept small: inputs are capped
  at the target's ``MAX_LEN``, and after a run a corpus of more than
  ``--max-corpus`` files (200) is minimised with libFuzzer's ``-merge=1``
  (the smallest set of inputs with the same coverage) and, if still too
  large, cut to the seeds plus the smallest inputs.
- ``fuzz/crashes/<name>/``: one input per distinct crash (``crash-<hash
  of its signature>``, the smallest seen) with a ``.txt`` beside it: the
  signature, the traceback and how to reproduce it. libFuzzer's own
  ``timeout-*``/``oom-*`` files land there too. Every saved crash is fed
  again at the start of each run, so a bug stays reported until it is
  fixed (then delete its files).

A crash does not stop a target's run: it is recorded once per signature
and fuzzing goes on (see ``fuzz/targets/_harness.py``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "targets"))
from _harness import ENV_CRASH_DIR, ENV_CRASH_LOG, ENV_KEEP_GOING, ENV_SEEDS_TO  # noqa: E402

MAX_CORPUS = 200
INPUT_TIMEOUT = 10  # seconds for one input before libFuzzer calls it a hang (hypothesis tests: 5 s)
RSS_LIMIT_MB = 2048
ARTIFACT_KINDS = ("crash-", "timeout-", "oom-", "leak-")
_print_lock = threading.Lock()


def default_out() -> str:
    bench = os.path.join(ROOT, "bench", "results")
    return os.path.join(bench, "fuzz.json") if os.path.isdir(bench) else os.path.join(HERE, "results.json")


def discover(targets_dir: str) -> dict[str, str]:
    """name -> script, for every fuzz_<name>.py in ``targets_dir``."""
    out = {}
    for entry in sorted(os.listdir(targets_dir)):
        m = re.fullmatch(r"fuzz_(\w+)\.py", entry)
        if m:
            out[m.group(1)] = os.path.join(targets_dir, entry)
    return out


def inputs_in(directory: str) -> list[str]:
    """The input files of a corpus or crash directory (not the notes)."""
    if not os.path.isdir(directory):
        return []
    return sorted(
        f
        for f in os.listdir(directory)
        if not f.endswith((".txt", ".tmp")) and os.path.isfile(os.path.join(directory, f))
    )


# -- libFuzzer's output -------------------------------------------------------------------------


def parse_stats(output: str) -> dict:
    """Executions and the rest from libFuzzer's output (-print_final_stats=1)."""
    stats: dict = {}
    for key in ("number_of_executed_units", "average_exec_per_sec", "new_units_added", "peak_rss_mb"):
        m = re.search(rf"^stat::{key}:\s*(\d+)", output, re.M)
        if m:
            stats[key] = int(m.group(1))
    if "number_of_executed_units" not in stats:
        # No final stats (killed): the last status line "#N ..." says how far it got.
        runs = re.findall(r"^#(\d+)\s", output, re.M)
        if runs:
            stats["number_of_executed_units"] = int(runs[-1])
    cov = re.findall(r"\bcov: (\d+) ft: (\d+)", output)
    if cov:
        stats["cov"], stats["ft"] = int(cov[-1][0]), int(cov[-1][1])
    return stats


def libfuzzer_failure(output: str) -> str:
    """The one-line reason libFuzzer stopped on its own (an exception that
    escaped the harness, a timeout, out of memory)."""
    m = re.search(r"=== Uncaught Python exception: ===\n(.+)", output)
    if m:
        return m.group(1).strip()
    m = re.search(r"ERROR: libFuzzer: (.+)", output)
    return m.group(1).strip() if m else "the fuzzer failed"


# -- one target ---------------------------------------------------------------------------------


def run_target(name: str, script: str, args: argparse.Namespace) -> dict:
    corpus = os.path.join(args.corpus_root, name)
    crashes = os.path.join(args.crashes_root, name)
    os.makedirs(corpus, exist_ok=True)
    os.makedirs(crashes, exist_ok=True)
    before = set(inputs_in(crashes))
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as tmp:
        # Known crashes first, from a copy (libFuzzer adds to the first
        # directory only, and the notes beside them are not inputs).
        replay = os.path.join(tmp, "replay")
        os.makedirs(replay)
        for f in before:
            shutil.copyfile(os.path.join(crashes, f), os.path.join(replay, f))
        log_path = os.path.join(tmp, "crashes.jsonl")
        env = dict(os.environ)
        env.update(
            {
                ENV_KEEP_GOING: "1",
                ENV_CRASH_DIR: crashes,
                ENV_CRASH_LOG: log_path,
                ENV_SEEDS_TO: corpus,
                "PYTHONHASHSEED": "0",
            }
        )
        cmd = [
            sys.executable,
            script,
            corpus,
            replay,
            f"-max_total_time={args.seconds}",
            "-print_final_stats=1",
            f"-timeout={args.input_timeout}",
            f"-rss_limit_mb={args.rss_limit_mb}",
            f"-artifact_prefix={crashes}{os.sep}",
        ]
        dictionary = os.path.join(HERE, "dicts", f"{name}.dict")
        if os.path.isfile(dictionary):
            cmd.append(f"-dict={dictionary}")
        started = time.monotonic()
        try:
            proc = subprocess.run(
                cmd,
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                timeout=args.seconds + 120,
            )
            output, returncode = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as e:
            raw = e.stdout or b""
            output = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
            returncode = None
        seconds = time.monotonic() - started
        crash_list = []
        if os.path.exists(log_path):
            with open(log_path, encoding="utf-8") as f:
                for line in f:
                    c = json.loads(line)
                    c["known"] = c["file"] in before
                    c["path"] = os.path.relpath(os.path.join(crashes, c["file"]), ROOT)
                    crash_list.append(c)
    # libFuzzer's own artifacts: an exception that escaped, a hang, OOM.
    artifacts = [f for f in sorted(set(inputs_in(crashes)) - before) if f.startswith(ARTIFACT_KINDS)]
    for f in artifacts:
        reason = libfuzzer_failure(output)
        crash_list.append(
            {
                "target": name,
                "signature": f"libFuzzer {f.split('-')[0]}: {reason}",
                "file": f,
                "error": reason,
                "known": False,
                "path": os.path.relpath(os.path.join(crashes, f), ROOT),
            }
        )
        with open(os.path.join(crashes, f + ".txt"), "w", encoding="utf-8") as note:
            note.write(f"target: {name}\nlibFuzzer stopped: {reason}\n\n{output[-6000:]}")
    ok_exit = returncode == 0
    if not ok_exit and not artifacts:
        crash_list.append(
            {
                "target": name,
                "signature": f"fuzzer exited with {returncode}" if returncode is not None else "fuzzer hung",
                "file": None,
                "error": libfuzzer_failure(output),
                "known": False,
                "path": None,
            }
        )
    stats = parse_stats(output)
    kept = trim_corpus(name, script, corpus, args) if args.max_corpus > 0 else len(inputs_in(corpus))
    result = {
        "executions": stats.get("number_of_executed_units", 0),
        "seconds": round(seconds, 1),
        "exec_per_sec": stats.get("average_exec_per_sec"),
        "crashes": len(crash_list),
        "crash_list": crash_list,
        "new_units": stats.get("new_units_added"),
        "coverage": stats.get("cov"),
        "features": stats.get("ft"),
        "peak_rss_mb": stats.get("peak_rss_mb"),
        "corpus_files": kept,
        "returncode": returncode,
    }
    if not ok_exit or not result["executions"]:
        result["output_tail"] = output[-4000:]
    return result


def trim_corpus(name: str, script: str, corpus: str, args: argparse.Namespace) -> int:
    """Keep at most ``args.max_corpus`` files: the seeds, then a coverage-
    minimal merge of the rest, then the smallest. Returns the count kept."""
    files = inputs_in(corpus)
    if len(files) <= args.max_corpus:
        return len(files)
    seeds = [f for f in files if f.startswith("seed-")]
    with tempfile.TemporaryDirectory(prefix=f"fuzz-merge-{name}-") as tmp:
        merged = os.path.join(tmp, "merged")
        os.makedirs(merged)
        env = dict(os.environ)
        env.update({ENV_KEEP_GOING: "1", ENV_CRASH_DIR: os.path.join(tmp, "crashes")})
        env.pop(ENV_CRASH_LOG, None)
        env.pop(ENV_SEEDS_TO, None)
        cmd = [sys.executable, script, "-merge=1", f"-timeout={args.input_timeout}", merged, corpus]
        try:
            subprocess.run(
                cmd,
                env=env,
                cwd=tmp,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=300,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pass
        chosen = set(inputs_in(merged))
        if not chosen:  # the merge failed: fall back to size alone
            chosen = set(files)
        with_seeds = set(seeds)
        rest = sorted(
            (f for f in chosen if f in files and f not in with_seeds),
            key=lambda f: (os.path.getsize(os.path.join(corpus, f)), f),
        )
        keep = with_seeds | set(rest[: max(0, args.max_corpus - len(with_seeds))])
        for f in files:
            if f not in keep:
                os.remove(os.path.join(corpus, f))
    return len(inputs_in(corpus))


# -- all of them ---------------------------------------------------------------------------------


def report_line(name: str, r: dict) -> str:
    line = f"{name:<12} {r['executions']:>12,} execs  {r['seconds']:>6.1f} s  {r['crashes']} crash(es)"
    line += f"  cov {r['coverage']}  corpus {r['corpus_files']}"
    for c in r["crash_list"]:
        tag = "known" if c["known"] else "NEW"
        line += f"\n    {tag}: {c['signature']}\n      {c['error']}\n      input: {c['path']}"
    return line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=int, default=60, help="fuzzing time per target (default 60)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these targets")
    p.add_argument(
        "--out", default=None, help="the JSON summary (default bench/results/fuzz.json or fuzz/results.json)"
    )
    p.add_argument("--jobs", type=int, default=1, help="targets fuzzed at once (default 1)")
    p.add_argument("--max-corpus", type=int, default=MAX_CORPUS, help="files kept per corpus (0: no trimming)")
    p.add_argument("--corpus-root", default=os.path.join(HERE, "corpus"))
    p.add_argument("--crashes-root", default=os.path.join(HERE, "crashes"))
    p.add_argument("--targets-dir", default=os.path.join(HERE, "targets"))
    p.add_argument("--input-timeout", type=int, default=INPUT_TIMEOUT, help="seconds per input before a hang")
    p.add_argument("--rss-limit-mb", type=int, default=RSS_LIMIT_MB)
    p.add_argument("--list", action="store_true", help="list the targets and exit")
    args = p.parse_args(argv)
    args.corpus_root = os.path.abspath(args.corpus_root)
    args.crashes_root = os.path.abspath(args.crashes_root)
    out_path = os.path.abspath(args.out or default_out())

    targets = discover(os.path.abspath(args.targets_dir))
    if args.list:
        print("\n".join(targets))
        return 0
    names = [n for part in (args.only or list(targets)) for n in part.split(",") if n]
    unknown = [n for n in names if n not in targets]
    if unknown or not names:
        p.error(f"unknown target(s) {', '.join(unknown)}; there are: {', '.join(targets)}")

    print(f"fuzzing {len(names)} target(s), {args.seconds} s each, {args.jobs} at a time", flush=True)
    started = datetime.datetime.now(datetime.UTC)
    results: dict[str, dict] = {}

    def one(name: str) -> None:
        r = run_target(name, targets[name], args)
        results[name] = r
        with _print_lock:
            print(report_line(name, r), flush=True)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for f in [pool.submit(one, n) for n in names]:
            f.result()

    total = sum(r["crashes"] for r in results.values())
    summary = {
        "started": started.isoformat(timespec="seconds"),
        "seconds_per_target": args.seconds,
        "python": sys.version.split()[0],
        "command": " ".join(["fuzz/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "total_executions": sum(r["executions"] for r in results.values()),
        "total_crashes": total,
        "targets": {n: results[n] for n in names},
    }
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    os.replace(tmp, out_path)
    failed = [n for n in names if results[n]["crashes"] or not results[n]["executions"]]
    print(f"{summary['total_executions']:,} executions, {total} crash(es); summary in {out_path}")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
