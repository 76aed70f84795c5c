"""The FastAPI service: OpenAI-compatible vision chat, REST chat with history, a web page."""
