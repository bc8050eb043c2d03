"""The privacy attack suite's reduced set (bench/privacy.py --ci): the real default model on a real 3-node route,
what each node was sent captured at the node, attacked per hop. It pins what a node on the route learns today."""

from __future__ import annotations

import json
import subprocess
import sys

from network_processes import ROOT, child_env


def test_every_node_on_the_route_recovers_the_prompt_it_was_sent(tmp_path, smollm):
    run = subprocess.run(
        [sys.executable, "bench/privacy.py", "--ci", "--checkpoint", str(smollm)],
        cwd=ROOT,
        env=child_env(tmp_path) | {"OMP_NUM_THREADS": "2"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert [hop["receives_hidden_states_after_layers"] for hop in result["hops"]] == [0, 1, 15]
    first, second, middle = result["hops"]
    for hop in (first, second):  # the embeddings, and the states after layer 1: every prompt, every secret, exactly
        exact = hop["exact_inversion"]
        assert exact["exact_prompts"] == 1.0 and exact["secrets_recovered_rate"] == 1.0
        assert exact["positions_verified_exactly"] == 1.0
    # after L/2 layers the budgeted attack still beats the baseline by far, and the baseline finds no secret
    assert middle["learned_decoder"]["token_recovery"] > 2 * middle["unigram_baseline"]["token_recovery"] + 0.1
    assert all(hop["unigram_baseline"]["secrets_recovered_rate"] == 0 for hop in result["hops"])
    assert result["relay"]["relayed_ms_per_token"] > 0 and result["relay"]["direct_ms_per_token"] > 0
