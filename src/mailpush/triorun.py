"""``trio-run NAME [ARGS]``: run a Trio application registered under NAME.

Applications register a callable in the ``trio_run.apps`` entry-point group
(mailpush registers ``mailpush = mailpush.cli:trio_app``); it gets the
remaining arguments and returns the exit status.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

__all__ = ["main"]

GROUP = "trio_run.apps"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    apps = {ep.name: ep for ep in entry_points(group=GROUP)}
    if not argv or argv[0] in ("-h", "--help"):
        names = ", ".join(sorted(apps)) or "(none installed)"
        print(
            "usage: trio-run NAME [ARGS...]\n"
            f"runs a Trio application registered in the '{GROUP}' entry points: {names}",
            file=sys.stderr,
        )
        return 0 if argv else 2
    ep = apps.get(argv[0])
    if ep is None:
        print(
            f"trio-run: no application named {argv[0]!r}; installed: {', '.join(sorted(apps)) or '(none)'}",
            file=sys.stderr,
        )
        return 2
    return int(ep.load()(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
