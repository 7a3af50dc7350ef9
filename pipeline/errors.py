"""The errors a user can cause, in one place: each str() is one line, and the CLI prints it as
`clipcurate: error: ...` with exit status 2 instead of a traceback. They live here, apart from the code that
raises them, so that any module can raise one without importing the module that owns the concept (the cause of
the old `context` <-> `stage` cycle). Narrower errors (ImageStoreError, EmbeddingError, PreflightError ...)
subclass these beside the code they describe."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad config file. str() is one line."""


class SchemaError(ValueError):
    """A shard lacks a column or has one of the wrong type. str() is one line naming both."""


class ShardError(RuntimeError):
    """A shard cannot be read or written. str() is one line naming the shard."""


class StageError(RuntimeError):
    """A stage cannot run (unknown name, bad input). str() is one line."""


__all__ = ["ConfigError", "SchemaError", "ShardError", "StageError"]
