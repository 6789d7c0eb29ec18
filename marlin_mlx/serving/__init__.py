"""Serving: a continuous-batching engine over a paged KV cache, and an OpenAI-compatible ASGI server."""
