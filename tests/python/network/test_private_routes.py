"""Private requests on a market where untrusted nodes serve the same layers for less: not one frame of a private
request reaches an untrusted node (counted at every node), through the OpenAI API (`"private": true` or the
`:private` model name) and `client chat --private`; without trusted cover the request fails with a clear error."""

from __future__ import annotations

import subprocess
import sys

import openai
import pytest

from network_processes import ROOT, child_env, free_port, running, start_node, wait_http

API_KEY = "private-key-123"
QUESTION = [{"role": "user", "content": "My password is hunter2. What is it?"}]


@pytest.fixture(scope="module")
def market(tiny, tmp_path_factory):
    """Trusted nodes t0 [0,2), t1 [2,5) at price 5; untrusted u0 [0,2), u1 [2,5) at price 1 (the cheaper route)."""
    home = tmp_path_factory.mktemp("private")
    nodes = {
        "t0": start_node(tiny, "0:2", home / "t0", "--price", "5"),
        "t1": start_node(tiny, "2:5", home / "t1", "--price", "5"),
        "u0": start_node(tiny, "0:2", home / "u0", "--price", "1"),
        "u1": start_node(tiny, "2:5", home / "u1", "--price", "1"),
    }
    with running(*nodes.values()):
        yield nodes


def frames(market) -> dict[str, int]:
    """Session frames each node has decrypted so far, as the node counts them."""
    return {name: node.info()["load"]["frames_received"] for name, node in market.items()}


def operator(node) -> str:
    return node.info()["operator"]


def serve(tiny, market, home, trusted: list[str]):
    """`shardmarket client serve` over all four nodes, trusting `trusted` operators; yields its /v1 URL."""
    port = free_port()
    log = home / "api.log"
    env = dict(child_env(home), SHARDMARKET_CLIENT_API_KEY=API_KEY)
    cmd = [sys.executable, "-m", "shardmarket", "client", "serve", "--checkpoint", str(tiny), "--model-id", "tiny"]
    cmd += ["--nodes", ",".join(n.url for n in market.values()), "--port", str(port), "--trust", ",".join(trusted)]
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", process, log, headers={"Authorization": f"Bearer {API_KEY}"})
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(15)


@pytest.fixture(scope="module")
def api(tiny, market, tmp_path_factory):
    yield from serve(tiny, market, tmp_path_factory.mktemp("api"), [operator(market["t0"]), operator(market["t1"])])


def test_no_frame_of_a_private_request_reaches_an_untrusted_node(api, market):
    client = openai.OpenAI(base_url=api, api_key=API_KEY, max_retries=0)
    before = frames(market)
    private = client.chat.completions.create(
        model="tiny", messages=QUESTION, max_tokens=6, temperature=0, extra_body={"private": True}
    )
    streamed = client.chat.completions.create(model="tiny:private", messages=QUESTION, max_tokens=6, temperature=0, stream=True)
    streamed_text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    after = frames(market)
    assert after["u0"] == before["u0"] and after["u1"] == before["u1"]  # not one frame, open and close included
    assert after["t0"] > before["t0"] and after["t1"] > before["t1"]
    assert streamed_text == private.choices[0].message.content

    # the same request, not private, takes the cheaper untrusted route: the untrusted nodes were the ones to avoid
    public = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=6, temperature=0)
    later = frames(market)
    assert later["u0"] > after["u0"] and later["u1"] > after["u1"]
    assert later["t0"] == after["t0"] and later["t1"] == after["t1"]
    assert public.choices[0].message.content == private.choices[0].message.content


def test_a_private_request_without_trusted_cover_fails_clearly_and_reaches_no_node(tiny, market, tmp_path):
    before = frames(market)
    for api in serve(tiny, market, tmp_path, [operator(market["t0"])]):  # nobody trusted serves layers [2, 5)
        client = openai.OpenAI(base_url=api, api_key=API_KEY, max_retries=0)
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=4, extra_body={"private": True})
        assert refused.value.status_code == 503
        error = refused.value.body
        assert error["code"] == "no_private_route"
        assert "no route of trusted operators covers layers [0, 5)" in error["message"]
        assert "sent to no other node" in error["message"]
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny:private", messages=QUESTION, max_tokens=4, extra_body={"private": False})
    assert frames(market) == before


def test_client_chat_private(tiny, market, tmp_path):
    def chat(*extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "shardmarket", "client", "chat", "My PIN is 4321.", "--checkpoint", str(tiny)]
        cmd += ["--model-id", "tiny", "--max-tokens", "3", "--nodes", ",".join(n.url for n in market.values()), *extra]
        return subprocess.run(cmd, check=False, cwd=ROOT, env=child_env(tmp_path), capture_output=True, text=True, timeout=120)

    before = frames(market)
    trusted = f"{operator(market['t0'])},{operator(market['t1'])}"
    assert chat("--private", "--trust", trusted).returncode == 0
    after = frames(market)
    assert (after["u0"], after["u1"]) == (before["u0"], before["u1"]) and after["t1"] > before["t1"]
    refused = chat("--private", "--trust", operator(market["t0"]))
    assert refused.returncode == 1
    assert "private request: no route of trusted operators" in refused.stderr
    assert frames(market) == after
