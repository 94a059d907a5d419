"""A Tornado WebSocket service through which signed-in users chat with an AI agent."""

__version__ = "0.1.0"
