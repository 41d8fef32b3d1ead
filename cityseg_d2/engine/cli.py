"""What our CLIs share: user errors become one line on stderr and exit code 2, not a traceback."""
import sys

from .setup import ConfigError
from .trainer import TrainingDivergedError


def user_error_types():
    """Errors caused by input (config, data, weights) rather than by a bug in this package."""
    from ..data import CityscapesDataError

    return (ConfigError, CityscapesDataError, TrainingDivergedError)


def run_cli(fn, *args, **kwargs):
    """Call fn; on a user error print `error: <message>` and exit 2."""
    try:
        return fn(*args, **kwargs)
    except user_error_types() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
