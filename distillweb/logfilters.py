"""Logging filters for messages known to be harmless (see LOGGING in settings)."""

import logging


class FilesystemBrokerHost(logging.Filter):
    """Drop kombu's "No hostname was supplied" warning: the filesystem transport has no host to supply."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No hostname was supplied")
