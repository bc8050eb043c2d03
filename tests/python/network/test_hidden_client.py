"""A hidden client reaches every node through a forwarding relay (net.relay.ForwardProxy): discovery and sessions,
over raw TCP and WebSocket, and the relay records nothing of the prompt or of the hidden states (only ciphertext)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from shardmarket.chain.eip712 import Domain
from shardmarket.client.generation import Completion, Privacy, RemoteModel
from shardmarket.client.routing import RouteError
from shardmarket.engine.sampling import SamplingParams
from shardmarket.engine.stage import Stage
from shardmarket.net.relay import ForwardProxy

from network_processes import running, start_node

DOMAIN = Domain(31337, "0x" + "00" * 20)
PROMPT = "my password is hunter2"


class RecordingRelay(ForwardProxy):
    """A relay that keeps every byte it forwards, as a curious relay operator would."""

    def __init__(self) -> None:
        super().__init__(allow_local=True)
        self.seen = bytearray()

    async def copy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tapped = asyncio.StreamReader(limit=2**20)

        async def tap() -> None:
            while chunk := await reader.read(65536):
                self.seen += chunk
                tapped.feed_data(chunk)
            tapped.feed_eof()

        await asyncio.gather(tap(), super().copy(tapped, writer))


@pytest.fixture(scope="module")
def nodes(tiny, tmp_path_factory):
    home = tmp_path_factory.mktemp("hidden")
    started = [start_node(tiny, "0:2", home / "a"), start_node(tiny, "2:5", home / "b")]
    with running(*started):
        yield started


@pytest.mark.parametrize("transport", ["tcp", "ws"])
def test_the_relay_sees_only_ciphertext(tiny, nodes, transport):
    async def scenario():
        relay = RecordingRelay()
        port = await relay.start("127.0.0.1", 0)
        privacy = Privacy.of([], relay=f"127.0.0.1:{port}", hidden=True)
        model = await RemoteModel.connect(
            tiny, [n.url for n in nodes], DOMAIN, model_id="tiny", transport=transport, privacy=privacy
        )
        discovery = len(relay.seen)
        ids = model.prompt_ids(PROMPT)
        before = [n.info()["load"]["frames_received"] for n in nodes]
        tokens = [t async for t in model.stream(ids, SamplingParams(max_tokens=4), Completion(len(ids)))]
        await model.aclose()
        await relay.close()
        return model, ids, tokens, discovery, before, bytes(relay.seen)

    model, ids, tokens, discovery, before, seen = asyncio.run(scenario())
    assert discovery > 0  # /info, /health and /probe went through the relay too
    assert all(n.info()["load"]["frames_received"] > b for n, b in zip(nodes, before, strict=True))
    embedded = model.head.embed(torch.tensor([ids + tokens[:-1]]))
    stage = Stage.load(tiny, 0, 2)
    stage.open_session("s", 64)
    after_two = stage.step("s", embedded, torch.arange(embedded.shape[1])[None])
    sent = [row.numpy().tobytes() for hidden in (embedded, after_two) for row in hidden[0]]
    assert len(seen) - discovery > sum(len(row) for row in sent)  # every hidden state crossed the relay...
    assert not [row for row in sent if row[:16] in seen]  # ...and not one 4-float run of any of them is readable there
    assert PROMPT.encode() not in seen and b"hunter2" not in seen


def test_a_hidden_request_without_a_relay_fails_clearly(tiny, nodes):
    async def scenario():
        model = await RemoteModel.connect(tiny, [n.url for n in nodes], DOMAIN, model_id="tiny")
        try:
            async for _ in model.stream([1, 2, 3], SamplingParams(max_tokens=2), Completion(3), hidden=True):
                pass
        finally:
            await model.aclose()

    before = [n.info()["load"]["frames_received"] for n in nodes]
    with pytest.raises(RouteError, match="no relay is set"):
        asyncio.run(scenario())
    assert [n.info()["load"]["frames_received"] for n in nodes] == before


def test_the_relay_refuses_local_destinations_unless_allowed(nodes):
    async def scenario() -> bytes:
        relay = ForwardProxy()  # as on the internet: the relay's own loopback and LAN are not for clients
        port = await relay.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"CONNECT 127.0.0.1:{nodes[0].port} HTTP/1.1\r\n\r\n".encode())
        answer = await reader.read(1024)
        writer.close()
        await relay.close()
        return answer

    assert asyncio.run(scenario()).startswith(b"HTTP/1.1 403")
