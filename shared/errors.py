"""alertgate's own exceptions, in one module so every module can raise them without import cycles.

    AlertgateError
    ├── SettingsError              invalid settings at start-up; names every bad setting
    ├── RequestRejected            a request refused with a 4xx problem naming field and rule
    ├── AlreadyAccepted            the ledger holds this operation already (another attempt won)
    ├── StorageUnavailable         storage could not settle a call within bounded retries → 503
    └── StateContention            a shared row kept changing under bounded conditional writes → 503
        ├── LedgerConflict         ... the ledger's accept counter or a chunk's end
        └── LimiterContentionError ... the shared call budget

Every exception the HTTP edge answers on purpose is one of these (shared.api.guarded); anything else is
a bug, answered as a problem naming an incident id, never a bare 500.
"""

from __future__ import annotations

from dataclasses import dataclass


class AlertgateError(Exception):
    """Base of every error alertgate raises on purpose."""


class SettingsError(AlertgateError):
    """One or more settings are invalid; the message names each setting and its rule."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {name}: {rule}" for name, rule in problems)
        super().__init__(f"alertgate cannot start: {len(problems)} invalid setting(s):\n{lines}")


@dataclass(frozen=True)
class FieldError:
    """One broken rule: `field` is where (`alertIds[2]`, `status`, a header name), `message` the rule."""

    field: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class RequestRejected(AlertgateError):
    """A request alertgate will not accept; `status` is the HTTP status it is answered with."""

    def __init__(self, status: int, title: str, detail: str, errors: list[FieldError] | None = None) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors or []
        super().__init__(detail)


class StorageUnavailable(AlertgateError):
    """Table or Queue storage could not settle a call within the seam's bounded retries (shared.storage).

    The HTTP edge answers 503 with Retry-After `retry_after`; a queue invocation fails so its message
    comes back. Whatever was accepted before stays in the ledger, and a retry with the same key is safe.
    """

    def __init__(self, detail: str, retry_after: float = 2.0) -> None:
        self.retry_after = retry_after
        super().__init__(detail)


class StateContention(AlertgateError):
    """A shared row kept changing under bounded conditional writes (many instances racing for it).

    Like StorageUnavailable it passes: the HTTP edge answers 503 with Retry-After.
    """

    def __init__(self, detail: str, retry_after: float = 1.0) -> None:
        self.retry_after = retry_after
        super().__init__(detail)


class LedgerConflict(StateContention):
    """Bounded ETag retries on the ledger ran out (very heavy contention on the accept counter)."""


class AlreadyAccepted(AlertgateError):
    """The operation exists already: another attempt accepted this request first."""


class LimiterContentionError(StateContention):
    """Other instances kept winning the conditional write on the call budget: the bounded 412 retries ran
    out. Raised instead of waiting without end, so the caller can defer the work (it is not a denial:
    nobody knows how long to wait)."""
