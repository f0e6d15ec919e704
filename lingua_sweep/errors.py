"""Errors a user can cause and fix; entry points print them as one line, without a traceback."""


class UserError(Exception):
    """A mistake in config, data or environment; the message names the fix."""


def did_you_mean(word: str, choices) -> str:
    """ "; did you mean X?" for the closest of `choices` to a mistyped `word`, else ""."""
    import difflib

    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""
