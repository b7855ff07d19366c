"""The one error type users see: the CLI prints its message as one line and exits non-zero."""


class HpoptError(Exception):
    """A failure the user can act on; the message is a complete sentence, no traceback needed."""
