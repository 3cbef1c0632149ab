"""Errors caused by the user's input, config or environment: the CLI prints them without a traceback."""


class UserError(Exception):
    """Base for errors whose message already says what is wrong and how to fix it."""


class NonFiniteLoss(UserError, FloatingPointError):
    """Training produced a NaN/inf loss; what was saved before stays."""
