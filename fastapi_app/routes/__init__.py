"""HTTP routes: OpenAI-compatible API, REST chat, health and metrics, the web page."""
