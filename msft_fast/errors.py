"""Errors a user can cause. The CLI prints them as one sentence and exits non-zero, no traceback."""


class UserError(Exception):
    """Base class: a problem in the user's config, data, model folder or output folder."""


class ConfigError(UserError):
    """A config key is unknown, missing, or has a bad value."""


class DataError(UserError):
    """A data file is missing or malformed, or a task ends up empty."""


class ModelError(UserError):
    """The model folder is missing, unreadable, or unsuitable."""


class OutputError(UserError):
    """The output folder cannot be used (a file, not writable, or holds a finished run)."""


class StopRequested(Exception):
    """A stop signal (SIGTERM, SIGINT) arrived: the run wrote a checkpoint after its current step
    and stopped; rerunning the same command resumes it. Not an error, but not a finished run."""

    def __init__(self, signal_name: str, step: int, checkpoint):
        where = f"checkpoint in {checkpoint}" if checkpoint else "no checkpoint could be written"
        super().__init__(f"stopped by {signal_name} after step {step}; {where}; rerun the same command to resume")
        self.signal_name = signal_name


class Interrupted(BaseException):
    """A stop signal arrived where the run cannot stop cleanly after a step: before training
    started, or a second signal. A BaseException like KeyboardInterrupt, so that nothing on the
    way out mistakes it for an error to handle."""

    def __init__(self, signal_name: str, detail: str = ""):
        super().__init__(f"interrupted by {signal_name}" + (f" {detail}" if detail else ""))
        self.signal_name = signal_name


def signal_exit_code(signal_name: str) -> int:
    """The shell's convention, 128 + the signal number: 130 for SIGINT, 143 for SIGTERM."""
    import signal

    return 128 + int(getattr(signal, signal_name, signal.SIGINT))


def on_every_rank(error: UserError) -> UserError:
    """Mark an error that every rank of a torchrun group raises alike (it follows from inputs all
    ranks share: the config, the tokenized data, the model's config), so that rank 0 alone prints it."""
    error.all_ranks = True
    return error
