"""The deployment kit in deploy/ is consistent with mailpush itself: the
systemd unit starts mailpush with options it accepts and gives the drain
time to finish; every sysctl it sets exists. (deploy/haproxy.cfg is loaded
by tests/test_haproxy.py.)"""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

from mailpush.cli import build_parser, config_from_args
from mailpush.drain import DRAIN_GRACE

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def unit() -> configparser.ConfigParser:
    text = (DEPLOY / "mailpush.service").read_text().replace("\\\n", " ")
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # keys are case-sensitive in systemd
    parser.read_string(text)
    return parser


def test_the_unit_starts_mailpush_with_options_it_accepts_and_waits_out_the_drain():
    service = unit()["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/mailpush") and argv[1] == "serve"
    args = build_parser().parse_args(argv[1:] + ["--secret", "x" * 32])
    config = config_from_args(args)
    assert service["KillSignal"] == "SIGTERM"  # SIGTERM drains
    assert float(service["TimeoutStopSec"]) > config.drain_seconds + DRAIN_GRACE  # before systemd's SIGKILL
    assert int(service["LimitNOFILE"]) > config.workers * config.max_connections
    assert service["Restart"] == "on-failure"


def test_every_sysctl_exists_on_this_kernel():
    keys = [line.split("=")[0].strip() for line in (DEPLOY / "sysctl.conf").read_text().splitlines() if line[:1].isalpha()]
    assert len(keys) >= 10
    missing = [k for k in keys if not Path("/proc/sys", *k.split(".")).exists()]
    assert not missing, missing
    for line in (DEPLOY / "sysctl.conf").read_text().splitlines():
        if line[:1].isalpha():
            assert "=" in line, line
