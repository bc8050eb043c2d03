"""The OpenMP wait policy of this process, which decides on which thread a lone decode step runs.

Every shardmarket process runs OpenMP with OMP_WAIT_POLICY=PASSIVE unless the user set a policy (`shardmarket` sets it
before torch loads). A pipeline stage is idle between its steps, and under libgomp's default a team thread spins on
after each step: that core is taken from the stage or the head that runs next on the same machine,
while a stage's own step is no slower with PASSIVE (its parallel regions follow each other closely). The README's
bench section has the figures.

With PASSIVE, a lone decode step (a node's lone session, a client's lone stream) runs on the event loop's thread,
saving two thread wake-ups. Under a policy that spins, every torch operation runs on one compute thread instead:
OpenMP gives each calling thread its own team, and once a process has more OpenMP threads than cores, libgomp stops
letting idle team threads spin between parallel regions, which makes every step slower.
"""

from __future__ import annotations

import os

PASSIVE_OPENMP = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"
