"""kfeed ingest: reads Kalshi (REST and WebSocket) and feeds the server through IngestService."""
