"""Errors raised by the graph encoding."""
from metaprune.errors import UserError


class UnsupportedArchitectureError(UserError):
    """The network uses an operation the graph encoding does not model.

    The message names the fx node, the module path and the operation.
    """


class MetanetworkError(UserError):
    """A metanetwork checkpoint is missing, of the wrong kind, or made for another layout."""
