"""Live snapshot feeds: the hub that fans committed data out, and the replay-then-live feed."""
