"""Kalshi Trade API v2 clients: request signing, REST (httpx) and WebSocket (websockets)."""
