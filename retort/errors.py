"""Every error retort raises on purpose, split by who must act.

    RetortError                    root: the CLI turns any of these into one line + exit code
    ├── UserError                  the user must fix an input
    │   ├── SpecError              a pipeline YAML is wrong: file, line, field, what was expected
    │   ├── TemplateError          a prompt template is wrong: template, line, variable
    │   ├── DatasetError           an input file is missing, unreadable, or lacks a column
    │   └── NotFoundError          a named pipeline, prompt, evaluator, model or table does not exist
    ├── BackendError               a model call failed: status, model, retryable or not
    │   └── EndpointUnreachable    preflight could not reach a base URL (fail before the run starts)
    ├── ParseError                 a completion did not parse; recorded on the row, never fatal
    └── CacheError                 the DuckDB file is locked by another process or damaged

Errors become messages only at the edge (cli.py); the traceback shows with --debug.
"""

from __future__ import annotations


class RetortError(Exception):
    """Root of every deliberate error. `str(err)` is the one line shown to the user."""

    exit_code = 1


class UserError(RetortError):
    exit_code = 2


class SpecError(UserError):
    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.file, self.line, self.field, self.detail = file, line, field, message
        where = ":".join(str(p) for p in (file, line) if p is not None)
        parts = [p for p in (where, field) if p]
        super().__init__(f"{' '.join(parts)}: {message}" if parts else message)


class TemplateError(UserError):
    def __init__(self, message: str, *, template: str, line: int | None = None) -> None:
        self.template, self.line = template, line
        where = f"{template}:{line}" if line else template
        super().__init__(f"{where}: {message}")


class DatasetError(UserError):
    pass


class NotFoundError(UserError):
    pass


class BackendError(RetortError):
    """A model call failed. `retryable` is decided by the backend from the status."""

    exit_code = 3

    def __init__(self, message: str, *, model: str = "", status: int | None = None,
                 retryable: bool = False, retry_after: float | None = None) -> None:
        self.model, self.status, self.retryable, self.retry_after = model, status, retryable, retry_after
        prefix = f"model {model!r}: " if model else ""
        code = f"HTTP {status}: " if status else ""
        super().__init__(f"{prefix}{code}{message}")


class EndpointUnreachable(BackendError):
    pass


class ParseError(RetortError):
    pass


class CacheError(RetortError):
    exit_code = 4
