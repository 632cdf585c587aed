"""The errors the project raises on purpose, and how the entry points report them: one message with its fix and a
non-zero exit status, without a traceback (``HYDRA_FULL_ERROR=1`` adds it, for debugging)."""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from engine.config import ConfigError
from engine.data import DataError
from engine.run_folder import RunFolderError
from models.weights import CheckpointError

EXPECTED_ERRORS = (ConfigError, DataError, CheckpointError, RunFolderError)
EXIT_CODE = 2


def message_of(err: BaseException) -> str:
    """The error's message; for one re-raised from a DataLoader worker (which quotes the worker's traceback), the
    original message only."""
    text = str(err)
    if "Original Traceback" in text:
        text = text.rsplit(f"{type(err).__name__}: ", 1)[-1]  # after the quoted "engine.data.DataError: "
    return text


@contextlib.contextmanager
def reported_errors(logger: logging.Logger) -> Iterator[None]:
    """Turn :data:`EXPECTED_ERRORS` raised inside into a logged message and ``SystemExit(2)``."""
    try:
        yield
    except EXPECTED_ERRORS as err:
        logger.error("%s", message_of(err), exc_info=err if os.environ.get("HYDRA_FULL_ERROR") == "1" else None)
        raise SystemExit(EXIT_CODE) from None
