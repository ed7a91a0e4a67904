"""The REST service: FastAPI app factory, routes, schemas, error mapping, metrics, settings."""
