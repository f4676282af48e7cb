"""Errors a request can cause; each message names the problem so the caller can fix the request."""


class RequestError(ValueError):
    """The request cannot be served as sent; the engine stays usable for the next one."""


class AudioError(RequestError):
    """Empty, silent, corrupt, too long, NaN, or of a dtype or shape the engine does not take."""


class OptionError(RequestError):
    """An unknown language, task or option, or options that contradict each other."""


class RequestCancelled(Exception):
    """The caller withdrew the request (a cancelled call, a closed stream): decoding stopped early."""
