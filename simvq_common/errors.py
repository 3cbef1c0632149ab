"""Errors caused by the user's input, config or environment: the CLI prints them without a traceback."""


class UserError(Exception):
    """Base for errors whose message already says what is wrong and how to fix it."""


class ConfigError(UserError, ValueError):
    """A setting, config file or override that cannot work (names the key and what would)."""


class ArtifactError(UserError, FileNotFoundError):
    """A path that is not the artifact a job needs (names what it is, and what to pass instead)."""


class NonFiniteLoss(UserError, FloatingPointError):
    """Training produced a NaN/inf loss; what was saved before stays."""


class DiskFullError(UserError, OSError):
    """A write failed for lack of space: names the path, the free space and the size needed; what was there
    before stays."""


class RunLockedError(UserError):
    """Another live process holds the run directory (names it: host, pid, since when)."""


class Preempted(UserError):
    """Training stopped on a scheduler's signal after checkpointing the step it finished: rerun to resume.
    The CLI exits with REQUEUE_EXIT (simvq_common.preemption) instead of 2."""
