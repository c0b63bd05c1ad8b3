"""`kiln serve`: an OpenAI-compatible HTTP server over the Executor (``kiln.serve.app.create_app``).

Kept free of imports so that ``kiln``'s CLI loads where the server's dependencies are absent (the
GPU benchmark machine has no FastAPI); the server modules import them when used.
"""
