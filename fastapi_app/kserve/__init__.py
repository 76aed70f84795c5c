"""KServe v2 over HTTP, answered by the service itself (local backend)."""
