"""Reachability in the NAT lab (root): per home-network variant, whether and how a node becomes reachable and
how many seconds until its endpoint is verified from outside; then round trips and a streamed answer through
the relay against the direct (port-mapped) path of the same node, in the same run. JSON on the last line."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from tests.python.reach.conftest import from_public, start_node
from tests.python.reach.lab import VARIANTS, Lab, missing_tools

REPEATS = 3
GOALS = {"mapping": 5.0, "relay": 10.0}


def variant_figures(name: str, *node_args: str) -> dict:
    """Median seconds to a verified endpoint over REPEATS fresh labs, and the path taken."""
    seconds, methods, reachable, nat = [], set(), True, ""
    for _ in range(REPEATS):
        with Lab(name) as lab:
            proc, report = start_node(lab, *node_args)
            answer = from_public(lab, "stream", report["endpoint"], 8) if report["verified"] else {}
            reachable &= report["verified"] and len(answer.get("events", [])) == 8
            seconds.append(report["seconds"])
            methods.add(report["method"])
            nat = report["nat_type"]
            lab.stop(proc)
    method = "/".join(sorted(m or "none" for m in methods))
    goal = GOALS["relay" if method == "relay" else "mapping"]
    median = statistics.median(seconds)
    return {
        "reachable": reachable,
        "method": method,
        "nat_type": nat,
        "seconds_to_verified_median": median,
        "seconds_to_verified_max": max(seconds),
        "goal_s": goal,
        "meets_goal": reachable and median < goal,
    }


def relay_vs_direct() -> dict:
    """The same node, reached directly through its PCP mapping and through the relay."""
    with Lab("pcp") as lab:
        proc, report = start_node(lab, "--also-relay")
        direct, relayed = report["endpoint"], report["relay_endpoint"]
        figures: dict[str, float] = {}
        for path, url in (("direct", direct), ("relay", relayed), ("direct", direct), ("relay", relayed)):
            echo = from_public(lab, "echo", url, 300)
            stream = from_public(lab, "stream", url, 512)
            assert len(stream["events"]) == 512
            figures.setdefault(f"rtt_ms_median_{path}", echo["rtt_ms_median"])
            figures[f"rtt_ms_median_{path}"] = min(figures[f"rtt_ms_median_{path}"], echo["rtt_ms_median"])
            per_event = stream["total_ms"] / 512
            figures[f"stream_ms_per_event_{path}"] = min(figures.get(f"stream_ms_per_event_{path}", 1e9), per_event)
        lab.stop(proc)
    figures["relay_rtt_overhead_ms"] = figures["rtt_ms_median_relay"] - figures["rtt_ms_median_direct"]
    figures["relay_rtt_ratio"] = figures["rtt_ms_median_relay"] / figures["rtt_ms_median_direct"]
    return {k: round(v, 4) for k, v in figures.items()}


def daemon_relay_vs_direct(tokens: int = 32) -> dict:
    """ms/token of the default model on one real node daemon, reached through its PCP mapping and
    through the relay, alternating, in the same lab."""
    try:
        from shardmarket.cli.engine import default_checkpoint
        from tests.python.reach.test_reach_daemon import hold_endpoint, start_daemon
    except (ImportError, pytest_skip()) as exc:
        return {"daemon_ms_per_token": f"not measured: {exc}"}
    checkpoint = default_checkpoint()
    layers = json.loads((checkpoint / "config.json").read_text())["num_hidden_layers"]
    with Lab("pcp") as lab:
        start_daemon(lab, checkpoint, f"0:{layers}")
        _, direct = hold_endpoint(lab)
        _, relayed = hold_endpoint(lab, "--methods", "")
        assert (direct["method"], relayed["method"]) == ("pcp", "relay"), (direct, relayed)
        figures: dict[str, list[float]] = {"direct": [], "relay": []}
        for path, report in [("direct", direct), ("relay", relayed)] * 3:
            out = lab.python_in(
                "pub", ["-m", "tests.python.reach.chat_timing", str(checkpoint), report["endpoint"], str(tokens)], timeout=300
            )
            figures[path].append(json.loads(out.stdout.strip().splitlines()[-1])["ms_per_token_median"])
    direct_ms, relay_ms = statistics.median(figures["direct"]), statistics.median(figures["relay"])
    return {
        "daemon_model": checkpoint.name,
        "daemon_ms_per_token_direct": round(direct_ms, 3),
        "daemon_ms_per_token_relay": round(relay_ms, 3),
        "daemon_relay_ms_per_token_ratio": round(relay_ms / direct_ms, 3),
    }


def pytest_skip() -> type[BaseException]:
    """The exception pytest.importorskip raises when the daemon's modules are missing."""
    import pytest

    return pytest.skip.Exception


def main() -> None:
    why = missing_tools()
    if why:
        print(json.dumps({"skipped": why}))
        return
    runs = {name: (name,) for name in VARIANTS} | {"pcp-lab, NAT-PMP only": ("pcp", "--methods", "natpmp")}
    variants = {label: variant_figures(*run) for label, run in tqdm(runs.items(), desc="variants")}
    result = {
        "variants": variants,
        "repeats": REPEATS,
        **relay_vs_direct(),
        **daemon_relay_vs_direct(),
        "all_variants_reachable": all(v["reachable"] for v in variants.values()),
        "all_meet_goal": all(v["meets_goal"] for v in variants.values()),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
