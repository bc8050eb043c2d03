"""A stage: layers [start, end) of a decoder-only model with per-session KV caches."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, PretrainedConfig

import shardmarket.engine.attention  # noqa: F401  (registers the stage attention)
from shardmarket.engine.architecture import family_of, stage_config
from shardmarket.engine.errors import CapacityError, DuplicateSession, EngineError, ShapeError, UnknownSession
from shardmarket.engine.formats import FLOATS, Numerics, convert, effective_weights, format_name, stored_format, use_int8_linears
from shardmarket.engine.kv_cache import SessionCache, StepCache
from shardmarket.engine.placement import (
    best_dtype,
    cache_device,
    check_devices,
    device_map_for,
    device_of,
    main_device,
    place_weights,
    uses_gpu,
)
from shardmarket.engine.weights import layer_tensors, tensor_index

EXPIRED_MEMORY = 4096  # how many expired ids are remembered, to say "expired" rather than "unknown"


def even_splits(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """`stages` contiguous layer ranges of nearly equal size covering [0, num_layers)."""
    if not 1 <= stages <= num_layers:
        raise EngineError(f"the number of stages must be within 1..{num_layers} (one layer at least per stage)")
    bounds = [round(i * num_layers / stages) for i in range(stages + 1)]
    return list(pairwise(bounds))


@dataclass(frozen=True)
class StageSource:
    """Where a stage's layers were read from and how they were placed, so a checker can load them in other numerics."""

    checkpoint: Path
    stored: str  # the weight format of the checkpoint's layers
    max_memory: dict | None
    offload_folder: Path | None


class StageLayers(nn.Module):
    """The decoder layers of a stage, numbered from 0, as accelerate places them."""

    def __init__(self, config: PretrainedConfig, layer_class: type[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layer_class(config, i) for i in range(config.num_hidden_layers))


class Stage:
    """Runs layers [start, end) for many sessions; every public method is thread-safe."""

    def __init__(
        self,
        config: PretrainedConfig,
        start: int,
        end: int,
        body: StageLayers,
        device_map: dict,
        numerics: Numerics,
        max_sessions: int,
        cache_budget_bytes: int | None,
        idle_timeout_s: float,
    ):
        self.config, self.start, self.end = config, start, end
        self.numerics = numerics
        self.dtype = FLOATS[numerics.dtype]
        self.source: StageSource | None = None  # set by load()
        self.hidden_size = config.hidden_size
        self.body = body
        self.device_map = device_map
        self.device = main_device(device_map)
        family = family_of(config)
        sliced = stage_config(config, start, end)
        self.rotary = family.rotary_embedding(config=sliced).to(self.device)
        # Gemma 3 rotates local and global layers with different bases: one embedding per layer type, else one for all
        self._layer_types: list[str] | None = list(sliced.layer_types) if family.rope_per_layer_type else None
        self.max_sessions = max_sessions
        self.cache_budget_bytes = cache_budget_bytes
        self.idle_timeout_s = idle_timeout_s
        self._sessions: dict[str, SessionCache] = {}
        self._expired: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.RLock()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self._cache_shapes: list[tuple[int, int, torch.device]] = []
        for i in range(end - start):
            device = cache_device(device_of(f"layers.{i}", device_map), self.device)
            self._cache_shapes.append((config.num_key_value_heads, head_dim, device))

    @classmethod
    def load(
        cls,
        checkpoint: Path,
        start: int,
        end: int,
        *,
        max_memory: dict | None = None,
        offload_folder: Path | None = None,
        weights: str | None = None,
        dtype: torch.dtype | None = None,
        max_sessions: int = 64,
        cache_budget_bytes: int | None = None,
        idle_timeout_s: float = 300,
    ) -> Stage:
        """Load only the tensors of layers [start, end) from `checkpoint` and place them within `max_memory`.

        `weights` converts the stored format to a coarser one (see formats); `dtype` is the activation dtype, by default
        the best of the hardware (placement.best_dtype)."""
        checkpoint = Path(checkpoint)
        if not (checkpoint / "config.json").exists():
            raise EngineError(f"{checkpoint} has no config.json; give a Hugging Face checkpoint folder")
        config = AutoConfig.from_pretrained(checkpoint)
        family = family_of(config)
        if not 0 <= start < end <= config.num_hidden_layers:
            raise EngineError(f"layer range [{start}, {end}) is outside the model's {config.num_hidden_layers} layers")
        check_devices(max_memory)
        tensors = layer_tensors(tensor_index(checkpoint), start, end)
        stored = stored_format(tensors)
        weights = weights or stored
        tensors = convert(tensors, weights)
        dtype = dtype or best_dtype(weights, uses_gpu(max_memory))
        if dtype not in FLOATS.values():
            raise EngineError(f"activations cannot be {dtype}; choose one of {', '.join(FLOATS)}")
        with init_empty_weights():
            body = StageLayers(stage_config(config, start, end), family.decoder_layer)
        if weights == "int8":
            use_int8_linears(body, tensors)
        device_map = device_map_for(body, max_memory, dtype, [family.decoder_layer.__name__], offload_folder)
        offload_dir = None
        if offload_folder is not None and "disk" in device_map.values():  # device_map_for refuses disk without a folder
            Path(offload_folder).mkdir(parents=True, exist_ok=True)
            offload_dir = Path(tempfile.mkdtemp(prefix=f"layers-{start}-{end}-", dir=offload_folder))
        place_weights(body, tensors, device_map, dtype, offload_dir)
        del tensors
        numerics = Numerics(effective_weights(weights, dtype), format_name(dtype))
        stage = cls(config, start, end, body.eval(), device_map, numerics, max_sessions, cache_budget_bytes, idle_timeout_s)
        stage.source = StageSource(checkpoint, stored, max_memory, offload_folder)
        if offload_dir is not None:
            weakref.finalize(stage, shutil.rmtree, offload_dir, True)
        return stage

    def with_numerics(self, numerics: Numerics) -> Stage:
        """These layers computed in `numerics` (this stage, or a new one read again from the same checkpoint and placed
        alike): a checker re-runs another node's hop the way that node computes it. EngineError if the stored
        weights cannot be converted to those numerics."""
        if numerics == self.numerics:
            return self
        if self.source is None:
            raise EngineError("this stage was not loaded from a checkpoint; it cannot be loaded in other numerics")
        return Stage.load(
            self.source.checkpoint,
            self.start,
            self.end,
            weights=numerics.weights,
            dtype=FLOATS[numerics.dtype],
            max_memory=self.source.max_memory,
            offload_folder=self.source.offload_folder,
        )

    # sessions

    def open_session(self, session_id: str, max_length: int) -> None:
        """Reserve a KV cache of `max_length` positions for `session_id`."""
        if not isinstance(session_id, str) or not session_id:
            raise EngineError("a session id must be a non-empty string")
        limit = self.config.max_position_embeddings
        if not isinstance(max_length, int) or not 1 <= max_length <= limit:
            raise ShapeError(f"max_length must be an integer in 1..{limit}, got {max_length!r}")
        need = SessionCache.nbytes(self._cache_shapes, max_length, self.dtype)
        with self._lock:
            self._evict_idle()
            if session_id in self._sessions:
                raise DuplicateSession(f"session {session_id} is already open; close it first or use another id")
            if len(self._sessions) >= self.max_sessions:
                raise CapacityError(f"this stage already serves {self.max_sessions} sessions; retry later")
            if self.cache_budget_bytes is not None and self.cache_bytes() + need > self.cache_budget_bytes:
                raise CapacityError(
                    f"a KV cache of {max_length} positions needs {need} bytes and only "
                    f"{self.cache_budget_bytes - self.cache_bytes()} of the budget are left; "
                    "ask for fewer positions or retry later"
                )
            self._sessions[session_id] = SessionCache(session_id, self._cache_shapes, max_length, self.dtype)
            self._expired.pop(session_id, None)

    def rerun(self, positions: list[int], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The outputs of a hop's steps (`inputs[i]` at `positions[i]`; a step may start early, dropping the positions
        after it) in a private session: a checker's re-run."""
        session = f"rerun-{uuid.uuid4().hex}"
        self.open_session(session, max([p + x.shape[1] for p, x in zip(positions, inputs, strict=True)] + [1]))
        try:
            return [
                self.step(session, x.to(self.dtype), torch.arange(p, p + x.shape[1]).unsqueeze(0))
                for p, x in zip(positions, inputs, strict=True)
            ]
        finally:
            self.close_session(session)

    def close_session(self, session_id: str) -> None:
        """Free the session's KV cache; UnknownSession if it is not open."""
        with self._lock:
            self._session(session_id)
            del self._sessions[session_id]

    def session_ids(self) -> list[str]:
        """The open sessions."""
        with self._lock:
            self._evict_idle()
            return list(self._sessions)

    def session_length(self, session_id: str) -> int:
        """How many positions the session's cache holds."""
        with self._lock:
            return self._session(session_id).length

    def cache_bytes(self) -> int:
        """Bytes reserved by the open sessions' KV caches."""
        with self._lock:
            return sum(SessionCache.nbytes(self._cache_shapes, s.max_length, self.dtype) for s in self._sessions.values())

    def _evict_idle(self) -> None:
        now = time.monotonic()
        for session_id, session in list(self._sessions.items()):
            if now - session.last_used > self.idle_timeout_s:
                del self._sessions[session_id]
                self._expired[session_id] = f"expired after {self.idle_timeout_s:g} s idle"
        while len(self._expired) > EXPIRED_MEMORY:
            self._expired.popitem(last=False)

    def _session(self, session_id: str) -> SessionCache:
        self._evict_idle()
        session = self._sessions.get(session_id)
        if session is None:
            why = self._expired.get(session_id, "is unknown or closed")
            raise UnknownSession(f"session {session_id} {why}; open a new session and prefill again")
        return session

    # forward passes

    def step(self, session_id: str, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run hidden [1, T, H] at absolute `positions` [1, T]; T > 1 is (chunked) prefill, T == 1 decode.

        Positions must be consecutive and start at most at the cache length (an earlier start rewrites from there).
        """
        with self._lock:
            session = self._session(session_id)
            steps = self._check(hidden, positions, session)
            start = int(positions[0, 0])
            session.length = min(session.length, start)
            out = self._forward([session], [start], hidden, positions)
            session.length = start + steps
            session.last_used = time.monotonic()
            return out.to(hidden.device)

    def step_batch(self, items: list[tuple[str, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """One decode step of several sessions in a single forward pass.

        Each item is (session_id, hidden[1,1,H], positions[1,1])."""
        if not items:
            return []
        with self._lock:
            ids = [session_id for session_id, _, _ in items]
            if len(set(ids)) != len(ids):
                raise ShapeError("a batch holds each session at most once")
            sessions = [self._session(session_id) for session_id in ids]
            for session, (_, hidden, positions) in zip(sessions, items, strict=True):
                if self._check(hidden, positions, session) != 1:
                    raise ShapeError("step_batch takes decode steps (T == 1); send prefill through step")
            starts = [int(positions[0, 0]) for _, _, positions in items]
            for session, start in zip(sessions, starts, strict=True):
                session.length = min(session.length, start)
            hidden = torch.cat([h for _, h, _ in items])
            positions = torch.cat([p for _, _, p in items])
            out = self._forward(sessions, starts, hidden, positions)
            now = time.monotonic()
            for session, start in zip(sessions, starts, strict=True):
                session.length, session.last_used = start + 1, now
            return [row.to(h.device) for row, (_, h, _) in zip(out.split(1), items, strict=True)]

    def _check(self, hidden: torch.Tensor, positions: torch.Tensor, session: SessionCache) -> int:
        if (
            not isinstance(hidden, torch.Tensor)
            or hidden.dim() != 3
            or hidden.shape[0] != 1
            or hidden.shape[2] != self.hidden_size
        ):
            shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise ShapeError(f"hidden states must be [1, T, {self.hidden_size}], got {shape}")
        if hidden.dtype != self.dtype:
            raise ShapeError(f"hidden states must be {self.dtype}, got {hidden.dtype}")
        steps = hidden.shape[1]
        if steps == 0:
            raise ShapeError("hidden states hold no position (T == 0)")
        if not isinstance(positions, torch.Tensor) or positions.dtype != torch.int64 or tuple(positions.shape) != (1, steps):
            shape = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
            raise ShapeError(f"positions must be int64 [1, {steps}], got {shape}")
        start = int(positions[0, 0])
        if steps > 1 and not torch.equal(positions[0].cpu(), torch.arange(start, start + steps)):
            raise ShapeError("positions must be consecutive")
        if start < 0 or start > session.length:
            raise ShapeError(f"position {start} must be within 0..{session.length} (the session's cache length)")
        if start + steps > session.max_length:
            raise ShapeError(f"positions up to {start + steps} exceed the session's max_length {session.max_length}")
        return steps

    @torch.inference_mode()
    def _forward(
        self, sessions: list[SessionCache], starts: list[int], hidden: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        x = hidden.to(self.device)
        positions = positions.to(self.device)
        if self._layer_types is None:
            embeddings = [self.rotary(x, positions)] * len(self.body.layers)
        else:
            by_type = {kind: self.rotary(x, positions, kind) for kind in set(self._layer_types)}
            embeddings = [by_type[kind] for kind in self._layer_types]
        cache = StepCache(sessions, starts)
        for layer, embedding in zip(self.body.layers, embeddings, strict=True):
            x = layer(x, position_embeddings=embedding, position_ids=positions, cache=cache)
        return x
