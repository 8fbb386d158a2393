"""Errors a job reports to its user (exit 1) rather than crashing with a traceback."""

from __future__ import annotations


class PipelineError(Exception):
    """A run failed for a reason the user can act on; the message says what and where."""


class ConfigError(PipelineError):
    """The configuration or command line is invalid (exit 2)."""


class StorageError(PipelineError):
    """The object store failed (after its retries): not a problem of the data, so never quarantined."""


class InputError(PipelineError):
    """Bad input data; names the file (or shard) and line (or row) at fault."""

    def __init__(self, source: str, line: int | None, problem: str):
        self.source = source
        self.line = line
        self.problem = problem
        where = f"{source}, line {line}" if line is not None else source
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # keep the fields when Ray ships the error back from a worker
        return (type(self), (self.source, self.line, self.problem))
