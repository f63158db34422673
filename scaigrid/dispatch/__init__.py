"""Sending a request to a backend and relaying its answer: OpenAI-compatible HTTP with SSE streaming."""
