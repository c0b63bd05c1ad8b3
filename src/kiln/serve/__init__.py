"""`kiln serve`: an OpenAI-compatible HTTP server over the Executor."""

from kiln.serve.app import create_app

__all__ = ["create_app"]
