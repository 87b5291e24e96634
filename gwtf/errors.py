"""Errors with a message a user can act on. The CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input or configuration: say what is wrong and what to do."""


class BadMessage(Exception):
    """A received message failed validation; it is dropped and the sender gets this reason back."""


class PeerError(Exception):
    """A peer could not be reached, timed out, or answered with an error."""
