"""llamastream: streaming chat from GGUF models on llama.cpp, under load control."""

__version__ = "0.1.0"

from llamastream.api.app import create_app
from llamastream.chat.prompt import ChatPrompt
from llamastream.chatstream import ChatStream
from llamastream.config import Settings
from llamastream.sessions.middleware import SessionMiddleware
from llamastream.sessions.store import DiskSessionStore

__all__ = [
    "ChatPrompt",
    "ChatStream",
    "DiskSessionStore",
    "SessionMiddleware",
    "Settings",
    "__version__",
    "create_app",
]
