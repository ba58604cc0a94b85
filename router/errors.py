"""Typed errors of the data plane, so callers can tell a bad message from a slow or failing worker."""


class RouterError(Exception):
    """Base class of every error raised by `router`."""


class PlacementError(RouterError, ValueError):
    """A placement table (or the endpoints given for it) is inconsistent."""


class WireError(RouterError):
    """A message on the wire is malformed.

    `req` and `layer` are filled in when the header got far enough to name them, so a server can
    address its error reply to the request that caused it.
    """

    def __init__(self, message: str, req: int | None = None, layer: int | None = None) -> None:
        super().__init__(message)
        self.req = req
        self.layer = layer


class DispatchTimeout(RouterError):
    """An expert worker did not answer (or accept) a dispatch within the dispatcher's timeout."""


class RemoteExpertError(RouterError):
    """An expert worker answered a dispatch with an error reply; the message carries its reason."""


class ExpertWorkerLost(RouterError):
    """The connection to an expert worker dropped while a dispatch to it waited for its reply."""
