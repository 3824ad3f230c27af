"""Where the emulator's in-process HTTP servers report a request that failed: the log, not sys.stderr."""

from __future__ import annotations

import logging
import sys
from typing import Any

_log = logging.getLogger(__name__)


class LoggedErrors:
    """A mixin for socketserver servers. socketserver prints a failed request's traceback to whatever
    sys.stderr is at that moment, from the server's thread: while a test captures stderr or runs a command
    through click's CliRunner, into that output, though the request came from another test's task. A
    client hanging up mid-request (a killed task, a dropped keep-alive connection, an abandoned upload) is
    the client's business, not an error here."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            _log.debug("client %s hung up", client_address, exc_info=True)
        else:
            _log.exception("request from %s failed", client_address)
