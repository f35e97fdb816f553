"""mailpush: a WebSocket push gateway for mail, on Trio."""

from .config import Config as Config
from .errors import MailpushError as MailpushError
from .server import Server as Server

__version__ = "0.1.0"
