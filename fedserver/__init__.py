"""The federation server: rounds and aggregation, client registry, persistence."""
