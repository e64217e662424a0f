"""Every error the project raises on purpose, under one base class."""

from __future__ import annotations


class RemindersError(Exception):
    """Base class for the project's own errors."""


class ConfigError(RemindersError):
    """A protocol, clinic or template file is missing or invalid."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class BookingRejected(RemindersError):
    """A booking cannot be accepted; `errors` maps each bad field to its reason."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{field}: {msg}" for field, msg in errors))


class NotFound(RemindersError):
    """The clinic has no booking with that id."""


class DeliveryError(RemindersError):
    """A channel could not deliver a message: transient, permanent, or of unknown outcome.

    `permanent`: retrying cannot help (HTTP 4xx, SMTP 5yz, a bad URL). `unknown`: the
    request may have reached the provider (a read timeout, a connection broken after the
    hand-over), so an immediate retry could send twice; never permanent. Neither: nothing
    was delivered and a retry may succeed.
    """

    def __init__(self, reason: str, *, permanent: bool = False, unknown: bool = False) -> None:
        if permanent and unknown:
            raise ValueError("a delivery error of unknown outcome cannot be permanent")
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.unknown = unknown
