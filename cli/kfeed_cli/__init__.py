"""The `kfeed` command: one entry point for the server, the ingest, the simulator and the demo."""
