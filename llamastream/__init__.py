"""llamastream: streaming chat from GGUF models on llama.cpp, under load control."""

__version__ = "0.1.0"

from llamastream.api.app import create_app
from llamastream.api.chatstream import ChatStream
from llamastream.chat.prompt import ChatPrompt
from llamastream.config import Settings
from llamastream.service import Service
from llamastream.sessions.disk_store import DiskSessionStore
from llamastream.sessions.middleware import SessionMiddleware

__all__ = [
    "ChatPrompt",
    "ChatStream",
    "DiskSessionStore",
    "Service",
    "SessionMiddleware",
    "Settings",
    "__version__",
    "create_app",
]
