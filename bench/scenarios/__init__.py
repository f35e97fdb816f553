"""The scenarios: one module per measurement, and the registry run.py walks.

A scenario is ``fn(ctx, spec) -> dict``: it starts its own server (a fresh
process, so scenarios don't inherit each other's heap), drives it with a
:class:`loadgen.LoadGen`, stops everything, and returns plain JSON-able
numbers. ``table(results)`` turns ``{server: result}`` into a Markdown
table, printed to the console and reused in RESULTS.md.

    _common.py          Profile and PROFILES (the sizes of a run), Context,
                        Scenario, settle_rss, the table and verdict helpers
    _memory.py          memory, memory_multi: RSS per idle connection (#2, #3)
    _upgrade.py         upgrade: upgrades/s (#2, #3)
    _fanout.py          fanout, broadcast: deliveries/s against the floor (#3, #2)
    _latency.py         latency: publish-to-receive percentiles on every bus (#3)
    _avalanche.py       avalanche: more clients than --max-connections at once (#4)
    _burst.py           burst: every connection sends at once (#4)
    _slow_consumers.py  slow_consumers: clients that never read (#4)
    _drain.py           drain: SIGTERM and --drain-seconds (#4)

Adding a scenario: a module beside these with ``fn`` and ``table`` (and
``verdicts`` if it measures an issue's target), its constants at the top;
its sizes in :class:`Profile`; a :class:`Scenario` in :data:`SCENARIOS`
below with the servers it applies to. run.py, the JSON files and
RESULTS.md pick it up from the registry; report.py plots only what it
knows.

The resource-control scenarios (issue 4: avalanche, burst, slow consumers,
drain) and the one-subscriber broadcast (issue 2) watch the server while
they load it with the threads of probes.py (RSS every few ms, /metrics,
a load balancer's /healthz) and judge the issues' targets in ``verdicts``:
each is ``{"issue", "target", "measured", "met"}``, shown under the
scenario's table and gathered in the summary of RESULTS.md.

The modules are private (``_memory.py`` holds the function ``memory``):
every name the one-module ``scenarios.py`` had is imported from here, as
it was, ``from scenarios import PROFILES, Context, settle_rss``.
"""

from __future__ import annotations

from ._avalanche import AVALANCHE_COUNTERS as AVALANCHE_COUNTERS
from ._avalanche import AVALANCHE_GAUGES as AVALANCHE_GAUGES
from ._avalanche import AVALANCHE_HIST_BINS as AVALANCHE_HIST_BINS
from ._avalanche import AVALANCHE_HIST_STEP_S as AVALANCHE_HIST_STEP_S
from ._avalanche import HEALTH_PERIOD_S as HEALTH_PERIOD_S
from ._avalanche import HEALTH_TIMEOUT_S as HEALTH_TIMEOUT_S
from ._avalanche import MAILPUSH_MAX_HANDSHAKES as MAILPUSH_MAX_HANDSHAKES
from ._avalanche import avalanche as avalanche
from ._avalanche import avalanche_table as avalanche_table
from ._avalanche import avalanche_verdicts as avalanche_verdicts
from ._burst import BURST_BOUND_BYTES as BURST_BOUND_BYTES
from ._burst import READ_BUFFER_BYTES as READ_BUFFER_BYTES
from ._burst import burst as burst
from ._burst import burst_table as burst_table
from ._burst import burst_verdicts as burst_verdicts
from ._common import FANOUT_GAP_S as FANOUT_GAP_S
from ._common import MEMORY_BUDGET_KB as MEMORY_BUDGET_KB
from ._common import PROFILES as PROFILES
from ._common import SETTLE_STEP_S as SETTLE_STEP_S
from ._common import SETTLE_TOLERANCE as SETTLE_TOLERANCE
from ._common import WS_PATH as WS_PATH
from ._common import Context as Context
from ._common import Profile as Profile
from ._common import Scenario as Scenario
from ._common import settle_rss as settle_rss
from ._drain import DRAIN_BINS as DRAIN_BINS
from ._drain import DRAIN_EDGE_S as DRAIN_EDGE_S
from ._drain import DRAIN_EVEN_HIGH as DRAIN_EVEN_HIGH
from ._drain import DRAIN_EVEN_LOW as DRAIN_EVEN_LOW
from ._drain import DRAIN_EXIT_MARGIN_S as DRAIN_EXIT_MARGIN_S
from ._drain import DRAIN_WAIT_EXTRA_S as DRAIN_WAIT_EXTRA_S
from ._drain import drain as drain
from ._drain import drain_table as drain_table
from ._drain import drain_verdicts as drain_verdicts
from ._fanout import BROADCAST_EVENT as BROADCAST_EVENT
from ._fanout import BROADCAST_SHARE as BROADCAST_SHARE
from ._fanout import BROADCAST_SUB as BROADCAST_SUB
from ._fanout import FANOUT_SHARE as FANOUT_SHARE
from ._fanout import broadcast as broadcast
from ._fanout import broadcast_combine as broadcast_combine
from ._fanout import broadcast_table as broadcast_table
from ._fanout import broadcast_verdicts as broadcast_verdicts
from ._fanout import fanout as fanout
from ._fanout import fanout_combine as fanout_combine
from ._fanout import fanout_table as fanout_table
from ._fanout import fanout_verdicts as fanout_verdicts
from ._latency import DRAIN_TIMEOUT_S as DRAIN_TIMEOUT_S
from ._latency import LATENCY_BUSES as LATENCY_BUSES
from ._latency import LATENCY_P99_MS as LATENCY_P99_MS
from ._latency import LATENCY_RATE as LATENCY_RATE
from ._latency import PUBLISH_TICK_S as PUBLISH_TICK_S
from ._latency import latency as latency
from ._latency import latency_table as latency_table
from ._latency import latency_verdicts as latency_verdicts
from ._memory import MULTI_WORKERS as MULTI_WORKERS
from ._memory import memory as memory
from ._memory import memory_combine as memory_combine
from ._memory import memory_multi as memory_multi
from ._memory import memory_table as memory_table
from ._memory import memory_verdicts as memory_verdicts
from ._slow_consumers import SLOW_ALONE_BASE as SLOW_ALONE_BASE
from ._slow_consumers import SLOW_ALONE_EVERY as SLOW_ALONE_EVERY
from ._slow_consumers import SLOW_LOG_EVERY as SLOW_LOG_EVERY
from ._slow_consumers import SLOW_ROUNDS_AFTER as SLOW_ROUNDS_AFTER
from ._slow_consumers import SLOW_RSS_SLACK as SLOW_RSS_SLACK
from ._slow_consumers import STALLED_MSS as STALLED_MSS
from ._slow_consumers import STALLED_PROBE_S as STALLED_PROBE_S
from ._slow_consumers import STALLED_RCVBUF as STALLED_RCVBUF
from ._slow_consumers import slow_consumers as slow_consumers
from ._slow_consumers import slow_consumers_table as slow_consumers_table
from ._slow_consumers import slow_consumers_verdicts as slow_consumers_verdicts
from ._upgrade import UPGRADE_TARGET as UPGRADE_TARGET
from ._upgrade import upgrade as upgrade
from ._upgrade import upgrade_combine as upgrade_combine
from ._upgrade import upgrade_table as upgrade_table
from ._upgrade import upgrade_verdicts as upgrade_verdicts

# The shared private helpers, importable from here as they were from
# scenarios.py, for scripts beside run.py (a soak test) that reuse them.
from ._common import _check_alive as _check_alive  # isort: skip
from ._common import _fmt as _fmt  # isort: skip
from ._common import _kb as _kb  # isort: skip
from ._common import _label as _label  # isort: skip
from ._common import _median_or_none as _median_or_none  # isort: skip
from ._common import _ok as _ok  # isort: skip
from ._common import _pct as _pct  # isort: skip
from ._common import _pct_fmt as _pct_fmt  # isort: skip
from ._common import _problems as _problems  # isort: skip
from ._common import _ratio as _ratio  # isort: skip
from ._common import _verdict as _verdict  # isort: skip
from ._common import _verdict_rows as _verdict_rows  # isort: skip

# -- the registry: run.py runs, and RESULTS.md shows, the scenarios in this order ---------

SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("memory", "Idle memory per connection", memory, memory_table, doc=memory.__doc__,
             verdicts=memory_verdicts, combine=memory_combine),
    Scenario("memory_multi", f"Idle memory with {MULTI_WORKERS} worker processes", memory_multi,
             memory_table, servers=["mailpush"], doc=memory_multi.__doc__, combine=memory_combine),
    Scenario("upgrade", "Upgrade rate", upgrade, upgrade_table, doc=upgrade.__doc__, verdicts=upgrade_verdicts,
             combine=upgrade_combine),
    Scenario("fanout", "Fan-out", fanout, fanout_table, doc=fanout.__doc__, verdicts=fanout_verdicts,
             combine=fanout_combine),
    # The peers of DESIGN.md's table too: for a reference server the
    # broadcast is its fan-out (one message to all), measured again here.
    Scenario("broadcast", "Broadcast: one subscriber's N tabs, one prebuilt frame", broadcast, broadcast_table,
             servers=["mailpush", "mailpush_shared", "picows", "node_ws", "socketify", "floor"], doc=broadcast.__doc__,
             verdicts=broadcast_verdicts, combine=broadcast_combine),
    Scenario("latency", "Publish-to-receive latency", latency, latency_table,
             servers=["mailpush", "floor"], doc=latency.__doc__, verdicts=latency_verdicts),
    # Resource control (issue 4): mailpush only, its limits under load.
    Scenario("avalanche", "Connection avalanche", avalanche, avalanche_table, servers=["mailpush"],
             doc=avalanche.__doc__, verdicts=avalanche_verdicts),
    Scenario("burst", "Burst: every connection sends at once", burst, burst_table, servers=["mailpush"],
             doc=burst.__doc__, verdicts=burst_verdicts),
    Scenario("slow_consumers", "Slow consumers", slow_consumers, slow_consumers_table, servers=["mailpush"],
             doc=slow_consumers.__doc__, verdicts=slow_consumers_verdicts),
    Scenario("drain", "Graceful drain", drain, drain_table, servers=["mailpush"], doc=drain.__doc__,
             verdicts=drain_verdicts),
]}
