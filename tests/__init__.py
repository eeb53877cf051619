"""kfeed tests."""
