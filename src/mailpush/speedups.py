"""The optional C paths (``mailpush._speedups``, built from ``_speedups.c``
at install when a C compiler is there): the fan-out (publish items, event
frames, the history's record loop, the dispatcher's send loop) and the
upgrade (the request head, one small frame from the browser).

:data:`C` is the extension module, or None: not built, or turned off with
``MAILPUSH_SPEEDUPS=0`` in the environment (to compare, or to rule it out).
Each of its functions has a Python twin that does the same step for step
(``items._py_fast_items``, ``packets.event_frame``'s msgspec path,
``history._record_loop``, ``Dispatcher.deliver``'s loop,
``handshake.parse_request``, ``frames.Decoder``); the twins run when
:data:`C` is None, and for every case the C code leaves to them.
"""

from __future__ import annotations

import os
from types import ModuleType

__all__ = ["C", "ENV", "load"]

ENV = "MAILPUSH_SPEEDUPS"


def load() -> ModuleType | None:
    """The extension, unless it is missing or ``MAILPUSH_SPEEDUPS=0``."""
    if os.environ.get(ENV, "1").strip() == "0":
        return None
    try:
        from . import _speedups  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _speedups


C: ModuleType | None = load()
