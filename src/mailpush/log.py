"""Logging with structlog: JSON lines when not on a terminal, readable
console lines on one. Lifecycle events at debug, refusals and errors at
warning with the reason. Tokens are never logged."""

from __future__ import annotations

import logging
import sys
import time

import structlog

__all__ = ["configure", "get_logger", "LogLimiter", "log_sighup"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Set the level and the output format ("auto", "json" or "console")."""
    if level not in _LEVELS:
        from .errors import ConfigError

        raise ConfigError(f"--log-level must be one of {', '.join(_LEVELS)}, got {level!r}")
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    if fmt not in ("json", "console"):
        from .errors import ConfigError

        raise ConfigError(f"--log-format must be auto, json or console, got {fmt!r}")
    renderer = structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # One write() per line: lines from several workers sharing stderr never interleave.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger() -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger("mailpush")


def log_sighup() -> None:
    """SIGHUP is ignored, with a log line: there is no configuration file
    to reload and logs go to stderr (nothing to reopen), and a terminal's
    hangup must not end a server silently."""
    get_logger().warning("sighup_ignored", hint="mailpush has nothing to reload; SIGTERM drains and stops it")


class LogLimiter:
    """At most one log line per ``interval`` seconds for a recurring event.

    A thousand slow consumers dropped at once, or a publisher sending bad
    payloads in a loop, must not become a thousand log lines: :meth:`tick`
    counts each occurrence and says when a line is due, with how many
    occurrences it stands for.
    """

    __slots__ = ("interval", "_next", "_count")

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._next = 0.0
        self._count = 0

    def tick(self) -> int:
        """Count one occurrence; the number to log now (this one and those
        not logged since the last line), or 0 when no line is due."""
        self._count += 1
        now = time.monotonic()
        if now < self._next:
            return 0
        n, self._count = self._count, 0
        self._next = now + self.interval
        return n
