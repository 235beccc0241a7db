"""The durable side: claim store backends, the stream-to-store writer, reconciliation."""
