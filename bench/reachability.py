"""A home node joining the market, timed in the NAT lab (root), one router variant after the other: `node up` behind
the router until it is reachable, verified and registered (model loading excluded, reported apart), the recovery
after the relay restarts or the router loses the mapping (seconds until the registry lists the new endpoint), and
ms/token of a paid chat through the OpenAI API, through the relay against the direct (PCP-mapped) path of the same lab.
The steps are tests/python/reach/test_home_node.py's journeys, run one at a time here. JSON on the last line."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.python.reach.lab import missing_tools
from tests.python.reach.test_home_node import VARIANTS, journey, seed

REPEATS = 2
GOALS = {"listed_mapped_s": 5.0, "listed_relayed_s": 10.0, "recovered_s": 10.0}


def median_of(runs: list[dict], key: str) -> float:
    return round(statistics.median(run[key] for run in runs), 3)


def main() -> None:
    why = missing_tools()
    if why:
        print(json.dumps({"skipped": why}))
        return
    with tempfile.TemporaryDirectory(prefix="bench-reach-") as root:
        seeded = seed(Path(root))
        variants = {}
        for variant, method in VARIANTS.items():
            runs = [journey(seeded, variant) for _ in range(REPEATS)]
            listed_goal = GOALS["listed_relayed_s" if method == "relay" else "listed_mapped_s"]
            figures = {key: median_of(runs, key) for key in runs[0] if key != "method"}
            figures |= {
                "method": method,
                "listed_goal_s": listed_goal,
                "meets_goals": figures["listed_after_serving_s"] < listed_goal and figures["recovered_s"] < GOALS["recovered_s"],
            }
            variants[variant] = figures
            print(variant, json.dumps(figures), file=sys.stderr, flush=True)
        relayed = [journey(seeded, "pcp", relay_only=True) for _ in range(REPEATS)]
    direct_ms, relay_ms = variants["pcp"]["ms_per_token"], median_of(relayed, "ms_per_token")
    print(
        json.dumps(
            {
                "variants": variants,
                "repeats": REPEATS,
                "ms_per_token_direct": direct_ms,
                "ms_per_token_relay": relay_ms,
                "relay_ms_per_token_ratio": round(relay_ms / direct_ms, 3),
                "all_meet_goals": all(v["meets_goals"] for v in variants.values()),
            }
        )
    )


if __name__ == "__main__":
    main()
