"""The request service: HTTP API, schemas, store, approvals, mail, workers, settings."""
