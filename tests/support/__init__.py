"""What the tests share, apart from fixtures (which live in the conftests).

- ``factories``: records with sensible defaults (markets, snapshots, trades, gaps).
- ``waiting``: the one way to wait for an effect (``eventually``), and for a server to serve.
- ``servers``: an in-process kfeed server, an IngestService publisher, error-detail readers.
- ``processes``: real ``kfeed`` processes (sim, serve, ingest) for end-to-end tests.
- ``clients``, ``security``, ``sim``, ``backtest``…: helpers of one area, shared across packages.
"""
