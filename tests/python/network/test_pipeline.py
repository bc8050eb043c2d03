"""The real default model split over 3 node processes (+ a spare) on loopback: same greedy text as a local
run, the OpenAI API through the official `openai` package, 20 concurrent streams, a wrong-shape node and a
kill -9 of the middle node during generation."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import openai
import pytest
import requests

from shardmarket.chain.eip712 import Domain
from shardmarket.client.generation import Completion, RemoteModel
from shardmarket.client.routing import RouteError
from shardmarket.engine.head import Head
from shardmarket.engine.sampling import SamplingParams, generate
from shardmarket.engine.stage import Stage

from network_processes import ROOT, child_env, free_port, running, start_node, wait_http, wait_ready

DOMAIN = Domain(31337, "0x" + "00" * 20)  # what nodes use when no DisputeManager is deployed
QUESTION = [{"role": "user", "content": "Write a short poem about the sea."}]
MAX_TOKENS = 12
API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def cluster(smollm, tmp_path_factory):
    """Nodes a [0,10), b [10,20), c [20,30), a pricier spare [10,20), a node that answers with a wrong shape, and
    a [10,20) and a [20,30) node that forge their commitments from their fourth step on."""
    home = tmp_path_factory.mktemp("cluster")
    nodes = {
        "a": start_node(smollm, "0:10", home / "a"),
        "b": start_node(smollm, "10:20", home / "b"),
        "c": start_node(smollm, "20:30", home / "c"),
        "spare": start_node(smollm, "10:20", home / "spare", "--price", "1000"),
        "wrong": start_node(smollm, "20:30", home / "wrong", "--test-fault", "wrong-shape"),
        "forger": start_node(smollm, "10:20", home / "forger", "--test-fault", "forge-commitments"),
        "last-forger": start_node(smollm, "20:30", home / "last-forger", "--test-fault", "forge-commitments"),
    }
    with running(*nodes.values()):
        yield nodes


@pytest.fixture(scope="module")
def head(smollm) -> Head:
    return Head.load(smollm)


@pytest.fixture(scope="module")
def reference(smollm, head) -> list[int]:
    """Greedy tokens of the whole model run locally in this process."""
    stage = Stage.load(smollm, 0, head.num_layers)
    stage.open_session("local", 256)
    ids = chat_ids(head)
    return list(
        generate(
            head, lambda hidden, positions: stage.step("local", hidden, positions), ids, SamplingParams(max_tokens=MAX_TOKENS)
        )
    )


def chat_ids(head: Head) -> list[int]:
    text = head.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    return head.tokenizer.encode(text, add_special_tokens=False)


def remote_tokens(smollm, urls, *, transport="tcp", on_token=None, prefer=None) -> tuple[list[int], Completion, RemoteModel]:
    async def go():
        model = await RemoteModel.connect(smollm, urls, DOMAIN, transport=transport, step_timeout_s=30)
        for node in model.nodes:
            if prefer is not None and node.url not in prefer:
                node.price = 1000  # steer routing to the preferred nodes
        ids = model.chat_ids(QUESTION)
        completion = Completion(len(ids))
        tokens = []
        try:
            async for token in model.stream(ids, SamplingParams(max_tokens=MAX_TOKENS), completion):
                tokens.append(token)
                if on_token is not None:
                    on_token(len(tokens))
        finally:
            await model.aclose()
        return tokens, completion, model

    return asyncio.run(asyncio.wait_for(go(), 120))


@pytest.mark.parametrize("transport", ["tcp", "ws"])
def test_greedy_output_over_three_nodes_equals_local_generate(smollm, cluster, reference, transport):
    urls = [cluster[n].url for n in ("a", "b", "c", "spare")]
    tokens, completion, _ = remote_tokens(smollm, urls, transport=transport)
    assert tokens == reference and len(tokens) == MAX_TOKENS
    assert completion.failovers == 0
    served = {name: cluster[name].info()["load"]["steps_served"] for name in ("a", "b", "c", "spare")}
    assert served["a"] and served["b"] and served["c"] and not served["spare"]  # the cheaper [10,20) node was chosen


def test_later_requests_open_on_the_kept_connections_and_a_restarted_node_costs_no_failover(smollm, cluster, reference, tmp_path):
    """A request's channels are kept once its sessions closed cleanly, so the next request opens each hop with one
    OPEN round trip (no connect, no handshake). A node restarted in between dropped its kept channel: the client
    connects to it again, with no fail-over and the same text."""
    d = start_node(smollm, "20:30", tmp_path / "d")
    wait_ready(d)

    async def go() -> list[tuple[list[int], int, int]]:
        model = await RemoteModel.connect(smollm, [cluster["a"].url, cluster["b"].url, d.url], DOMAIN, step_timeout_s=30)
        # restarting a node takes longer than the pool's 30 s idle expiry on a loaded machine, and a, b's kept
        # channels must outlive it (expiry has its own test in test_node_protocol.py)
        model.channels.idle_s = float("inf")
        sessions = []
        model.on_finished = sessions.append
        ids, runs, restarted = model.chat_ids(QUESTION), [], d
        try:
            for restart in (False, False, True):
                if restart:
                    await asyncio.to_thread(d.stop)
                    restarted = start_node(smollm, "20:30", tmp_path / "d", port=d.port)  # same key
                    await asyncio.to_thread(wait_ready, restarted)
                completion = Completion(len(ids))
                tokens = [t async for t in model.stream(ids, SamplingParams(max_tokens=MAX_TOKENS), completion)]
                runs.append((tokens, completion.failovers, sessions[-1].reused_channels))
            assert len(model.channels) == 3 and not model.failed.current()
        finally:
            await model.aclose()
            await asyncio.to_thread(restarted.stop)
        return runs

    runs = asyncio.run(asyncio.wait_for(go(), 180))
    assert [tokens for tokens, _, _ in runs] == [reference] * 3
    assert [failovers for _, failovers, _ in runs] == [0, 0, 0]
    assert [reused for _, _, reused in runs] == [0, 3, 2]  # the restarted node's hop connected again


def test_a_node_answering_with_a_wrong_shape_is_refused(smollm, cluster, reference):
    with pytest.raises(RouteError, match="wrong shape"):
        remote_tokens(smollm, [cluster[n].url for n in ("a", "b", "wrong")])
    preferred = {cluster[n].url for n in ("a", "b", "wrong")}
    tokens, completion, _ = remote_tokens(smollm, [cluster[n].url for n in ("a", "b", "wrong", "c")], prefer=preferred)
    assert tokens == reference and completion.failovers == 1


@pytest.fixture(scope="module")
def api(smollm, cluster, tmp_path_factory):
    """`shardmarket client serve` over nodes a, b, c and the spare."""
    home = tmp_path_factory.mktemp("api")
    port = free_port()
    nodes = ",".join(cluster[n].url for n in ("a", "b", "c", "spare"))
    log = home / "api.log"
    env = dict(child_env(home), SHARDMARKET_CLIENT_API_KEY=API_KEY)
    cmd = [
        sys.executable,
        "-m",
        "shardmarket",
        "client",
        "serve",
        "--checkpoint",
        str(smollm),
        "--nodes",
        nodes,
        "--port",
        str(port),
    ]
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", process, log, headers={"Authorization": f"Bearer {API_KEY}"})
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(15)


def test_openai_package_chat_and_completions(api, smollm, head, reference):
    client = openai.OpenAI(base_url=api, api_key=API_KEY, max_retries=0)
    expected = head.tokenizer.decode(reference, skip_special_tokens=True)
    assert [m.id for m in client.models.list()] == [smollm.name]

    answer = client.chat.completions.create(model=smollm.name, messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0)
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens == len(chat_ids(head)) and answer.usage.completion_tokens == MAX_TOKENS
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + MAX_TOKENS

    stream = client.chat.completions.create(
        model=smollm.name,
        messages=QUESTION,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # it really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS

    prompt = "The capital of France is"
    completion = client.completions.create(model=smollm.name, prompt=prompt, max_tokens=4, temperature=0)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=smollm.name, prompt=prompt, max_tokens=4, temperature=0, stream=True)
    )
    assert completion.choices[0].text == streamed and completion.usage.completion_tokens == 4


def test_openai_errors_have_openai_shape(api, smollm):
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=api, api_key="wrong", max_retries=0).models.list()
    assert err.value.body["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=api, api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4", messages=QUESTION)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=smollm.name, messages=QUESTION, temperature=7)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=smollm.name, messages=[])
    assert err.value.body["param"] == "messages"


def test_a_callers_mistake_is_a_400_and_leaves_the_route_usable(api, smollm):
    """A seed no generator takes, a lone surrogate, and a request past the model's context: each a 400 in OpenAI's
    shape that names the parameter (never internal text), and the next good request is answered at once."""
    client = openai.OpenAI(base_url=api, api_key=API_KEY, max_retries=0)
    bad = [
        ({"messages": QUESTION, "seed": 2**200}, "seed", None),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages", None),
        ({"prompt": "hello \ud800"}, "prompt", None),
        ({"messages": [{"role": "user", "content": "hello " * 9000}]}, "messages", "context_length_exceeded"),
        ({"messages": [{"role": "user", "content": "hello " * 4400}], "max_tokens": 3900}, "messages", "context_length_exceeded"),
    ]
    for body, param, code in bad:
        path = "/completions" if "prompt" in body else "/chat/completions"
        reply = requests.post(
            f"{api}{path}",
            data=json.dumps({"model": smollm.name, **body}),
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
            timeout=60,
        )
        error = reply.json()["error"]
        assert reply.status_code == 400, (body, reply.text)
        assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
        assert "Traceback" not in error["message"] and "internal" not in error["message"]
    answer = client.chat.completions.create(model=smollm.name, messages=QUESTION, max_tokens=2)
    assert answer.choices[0].message.content


def test_the_api_serves_its_block_store_to_verifiers_without_a_key(api):
    root = api.removesuffix("/v1")
    request = urllib.request.Request(
        f"{root}/ipfs/bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku", headers={"Accept": "application/vnd.ipld.raw"}
    )
    with pytest.raises(urllib.error.HTTPError) as missing:  # the store is empty: not found, yet no key was asked for
        urllib.request.urlopen(request, timeout=10)
    assert missing.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as refused:  # the OpenAI API still needs the key
        urllib.request.urlopen(f"{api}/models", timeout=10)
    assert refused.value.code == 401


def test_twenty_concurrent_streams_through_one_pipeline(api, smollm, head):
    client = openai.AsyncOpenAI(base_url=api, api_key=API_KEY, max_retries=0, timeout=180)
    questions = [f"Say the number {i}." for i in range(20)]

    async def ask(question: str) -> str:
        stream = await client.chat.completions.create(
            model=smollm.name, messages=[{"role": "user", "content": question}], max_tokens=6, temperature=0, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def ask_all() -> tuple[list[str], str]:
        answers = await asyncio.gather(*(ask(q) for q in questions))
        return answers, await ask(questions[7])

    answers, alone = asyncio.run(ask_all())
    assert all(answers) and len(answers) == 20
    assert answers[7] == alone  # batching with 19 other streams does not change a greedy answer


def test_client_chat_streams_the_answer_to_the_terminal(smollm, cluster, head, reference, tmp_path):
    nodes = ",".join(cluster[n].url for n in ("a", "b", "c"))
    cmd = [
        sys.executable,
        "-m",
        "shardmarket",
        "client",
        "chat",
        QUESTION[0]["content"],
        "--checkpoint",
        str(smollm),
        "--nodes",
        nodes,
        "--max-tokens",
        str(MAX_TOKENS),
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=child_env(tmp_path), check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == head.tokenizer.decode(reference, skip_special_tokens=True) + "\n"


@pytest.mark.parametrize(
    ("route", "honest"), [(("a", "forger", "c"), "b"), (("a", "b", "last-forger"), "c")], ids=["middle-hop", "last-hop"]
)
def test_a_forged_commitment_found_while_its_output_is_used_redoes_the_step_with_the_same_text(
    smollm, cluster, reference, route, honest
):
    """The forger's answer already went on to the next hop (or to the head, which picks the token meanwhile) when
    its commitment fails the check: the whole step is redone on a new request id around the forger, and the text
    equals the undisturbed run."""
    forger = route[1] if honest == "b" else route[2]
    preferred = {cluster[n].url for n in route}
    tokens, completion, model = remote_tokens(smollm, [cluster[n].url for n in (*route, honest)], prefer=preferred)
    assert tokens == reference
    assert completion.failovers == 1
    assert model.failed.current() == {cluster[forger].url}


def test_kill_9_of_the_middle_node_fails_over_to_the_spare_with_the_same_text(smollm, cluster, reference):
    b, spare = cluster["b"], cluster["spare"]
    before = spare.info()["load"]["steps_served"]

    def kill_after_five(count: int) -> None:
        if count == 5:
            os.kill(b.process.pid, signal.SIGKILL)
            b.process.wait()

    tokens, completion, _ = remote_tokens(smollm, [cluster[n].url for n in ("a", "b", "c", "spare")], on_token=kill_after_five)
    assert b.process.returncode == -signal.SIGKILL
    assert tokens == reference
    assert completion.failovers == 1
    assert spare.info()["load"]["steps_served"] > before
