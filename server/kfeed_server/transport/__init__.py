"""The gRPC transport layer: servicers, conversions and interceptors. No SQL here."""
