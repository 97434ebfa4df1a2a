"""campaignd: a campaign-dispatch daemon that sends each recipient exactly once, across restarts."""

import os
import signal
from types import FrameType

__version__ = "0.1.0"


def _stopped_before_started(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


# As PID 1 (a container image run without an init), the kernel drops any signal that has no
# handler: a SIGTERM during the second or so of imports and configuration, before the
# daemon's event loop installs its own, was ignored until the runtime's SIGKILL. Installed
# here, on the package's first import, so that it covers the imports that follow; nothing
# has started yet, so ending at once (exit 143, as by the signal) loses nothing.
if os.getpid() == 1:
    signal.signal(signal.SIGTERM, _stopped_before_started)
