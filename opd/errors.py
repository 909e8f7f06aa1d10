"""User-facing errors: the CLI prints these as one line (no traceback unless --debug)."""


class OpdError(Exception):
    """A problem with the user's input or environment, stated in one line."""
