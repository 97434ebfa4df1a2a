"""campaignd: a campaign-dispatch daemon that sends each recipient exactly once, across restarts."""

__version__ = "0.1.0"
