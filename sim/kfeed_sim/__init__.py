"""kfeed sim: an offline, Kalshi-compatible exchange for the demo and the tests."""
