"""The client: routing over nodes, inference sessions with fail-over, the OpenAI-compatible API."""
