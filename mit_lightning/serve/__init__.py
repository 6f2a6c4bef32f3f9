"""`mit serve`: trained models behind an HTTP API and a web page, several tasks on one loaded backbone.

- `cli`: the command (loads the adapters, starts uvicorn);
- `app`: the FastAPI application (endpoints, bad-request handling, the page under `static/`);
- `batching`: the dynamic batcher that runs concurrent requests together in one model thread.
"""
