"""One error family: every message is a single line a user can act on."""

from __future__ import annotations


class ImagingError(Exception):
    """Base of every error the product raises on purpose; ``str()`` is the one-line message."""


class ParameterError(ImagingError):
    """A parameter, a request field or a YAML parameter set is wrong."""


class SourceError(ImagingError):
    """The instance image cannot be used as it is (missing, not an image, corrupt, unsupported)."""


class GuestError(ImagingError):
    """Something inside the guest filesystem is missing or unsafe."""


class SpaceError(ImagingError):
    """Not enough free space for the work ahead."""


class ToolMissing(ImagingError):
    """A required host tool is not installed."""


class BootFailed(ImagingError):
    """The artifact did not boot to its marker or a login prompt."""


class Interrupted(KeyboardInterrupt):
    """The stage was interrupted (SIGTERM, or the pipeline went away).

    A KeyboardInterrupt, not an Exception, so no ``except Exception`` on the way can swallow it.
    """


class CommandError(ImagingError):
    """An external command failed; keeps the full result for the record."""

    def __init__(self, message: str, result: object) -> None:
        super().__init__(message)
        self.result = result


class StoreError(ImagingError):
    """The request service refused an operation; ``status`` is the HTTP code that says why
    (403, 404, 409), or 5xx when the database failed."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
