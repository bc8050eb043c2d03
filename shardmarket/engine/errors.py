"""Errors of the shard engine; each message says what happened and what to do."""


class EngineError(Exception):
    """Base of every engine error."""


class UnknownSession(EngineError):
    """The session id is unknown, closed or expired: open a new session and prefill again."""


class DuplicateSession(EngineError):
    """A session with this id is already open: close it first or pick another id."""


class ShapeError(EngineError):
    """Hidden states or positions have the wrong shape, dtype or position; nothing was changed."""


class CapacityError(EngineError):
    """Too many sessions, or the KV-cache memory budget is spent: retry later or on another node."""


class UnsupportedModel(EngineError):
    """The checkpoint's architecture is not one the engine runs (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3)."""
