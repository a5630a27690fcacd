"""What the logging tests share: a root logger without handlers, as in a fresh process."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def bare_root() -> Iterator[logging.Logger]:
    """The root logger with no handler, as before an application configures logging.

    pytest gives the root logger its capture handlers at the start of each test phase,
    so this must run inside the test itself (not in a fixture); they come back after.
    """
    root = logging.getLogger()
    saved = list(root.handlers)
    for handler in saved:
        root.removeHandler(handler)
    try:
        yield root
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)
