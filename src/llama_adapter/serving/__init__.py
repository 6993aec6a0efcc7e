"""The OpenAI-compatible server: `app` (routes, `Server`), `protocol` (requests, errors), `responses` (bodies, SSE)
and `engine` (continuous batching on a background thread)."""
