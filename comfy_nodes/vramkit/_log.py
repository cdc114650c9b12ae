"""One log line per reason: attention runs hundreds of times per image, so a condition that repeats on every
call (a mode that cannot run, a call handed to ComfyUI's backend, a budget nothing fits) is logged at its
level the first time and at debug level after that."""

from __future__ import annotations

import logging
from collections.abc import Hashable

#: The keys already logged in this process (tests reset it).
_warned: set[Hashable] = set()


def log_once(logger: logging.Logger, key: Hashable, msg: str, *args: object, level: int = logging.WARNING) -> None:
    """Logs `msg % args` on `logger` at `level` the first time `key` is seen in this process, and at debug
    level after that."""
    if key in _warned:
        logger.debug(msg, *args)
        return
    _warned.add(key)
    logger.log(level, msg, *args)
