"""The errors a user can cause, and how command-line tools report them: one `error:` line and exit code 2.

Everything else is a bug of ours or of a dependency and keeps its traceback.
"""

import logging
import signal
import sys


class UserError(Exception):
    """Caused by input (a config, a file, a sweep, a checkpoint), not by a bug; the message says what and where."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A config, a sweep file or what they name (datasets, weights, metrics) is wrong."""


class CityscapesDataError(UserError, ValueError):
    """A Cityscapes file or folder is missing or malformed; the message names it."""


class TrainingDivergedError(UserError, FloatingPointError):
    """A loss became NaN or inf; the message says at which iteration and what usually helps."""


class OutputDirError(UserError):
    """OUTPUT_DIR is in use by another training, holds one that would be overwritten, or cannot be written."""


class CheckpointError(UserError):
    """No checkpoint to resume from can be read, or one just written cannot be read back."""


class ExportError(UserError):
    """The model, its weights or the requested format cannot be exported; the message says why."""


class SubmissionError(UserError):
    """The split, the output or a submission zip is not what a benchmark submission needs; the message says what."""


class TrainingInterrupted(UserError):
    """SIGTERM or SIGINT stopped training after a checkpoint was saved; exits like a process killed by that signal
    (128 + its number), as schedulers and shells expect."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.exit_code = 128 + signum
        self.signal_name = signal.Signals(signum).name


class TrainingStopped(BaseException):
    """Training was asked to stop and did, e.g. a Ray Tune trial that ASHA or PBT stopped at a report: a normal end,
    not a failure. A BaseException, like SystemExit, so that detectron2's train loop does not log it as an error and
    `except Exception` blocks let it through."""


def first_line(error):
    """The first non-empty line of an exception's message (KeyError's repr quotes stripped), else its type name."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else type(error).__name__


def run_cli(fn, *args, **kwargs):
    """Call fn; on a UserError print `error: <message>` on stderr and exit with its code (2 unless it says so)."""
    # A log file on a full disk must not print a traceback for every line logged after it filled up.
    logging.raiseExceptions = False
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C outside training, or a second one in it (the first saves a checkpoint)
        print("error: interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
