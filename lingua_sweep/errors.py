"""Errors a user can cause and fix; entry points print them as one line, without a traceback."""


class UserError(Exception):
    """A mistake in config, data or environment; the message names the fix."""
