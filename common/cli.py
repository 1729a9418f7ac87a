"""One error type for everything a user can fix, and one way for a command to report it."""

from collections.abc import Iterator
from contextlib import contextmanager


class BundleError(RuntimeError):
    """Something the user can fix: bad input, a missing file or tool. The message says what to do."""


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn a BundleError or a bad Hydra override into `error: <message>` and exit status 1."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except BundleError as err:
        raise SystemExit(f"error: {err}") from None
    except (HydraException, OmegaConfBaseException) as err:  # their messages span lines
        raise SystemExit("error: " + " ".join(str(err).split())) from None
