"""The HTTP API and the web page of `mit serve`.

FastAPI (on uvicorn) rather than litserve: every adapter must run on the one LLM loaded in this
process, in one model thread that swaps the adapters' taps between batches. litserve runs each API
in worker processes of its own (one backbone copy each) and batches per API; here the batching is a
small asyncio batcher (`batching.py`) in front of that one thread, and FastAPI adds only request
parsing, an in-process test client and static files for the page.

Endpoints (errors are ``{"error": "..."}`` with a 4xx status; the server keeps serving):

- ``GET /`` the page; ``GET /adapters`` the loaded adapters, their task and inputs; ``GET /stats`` batching so far
- ``POST /adapters/{name}/segment`` multipart: ``image`` file, one or more ``expression`` fields, optional
  ``probability_map`` → per expression the mask and the overlay as base64 PNG, at the image's own size (the
  overlay in the colour that stands out most from the masked pixels: red, or cyan over a red object), the
  mask's confidence (mean foreground probability over it) and, if asked, the probability map (grey PNG)
- ``POST /adapters/{name}/classify`` multipart: ``image`` file, ``text`` → label and probabilities
- ``POST /adapters/{name}/sentiment`` JSON: ``{"text": ..., "sequences": {"audio": [[...], ...], "facial": ...}}``
  (each sequence steps × features) → score

Status codes: 400 an input the model cannot read (not an image, empty text, wrong array shapes, the
wrong task for the adapter), 404 an unknown adapter, 413 an upload, image or input over the limits,
422 a missing or mistyped field.
"""

from __future__ import annotations

import base64
import io
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, File, Form, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from mit_lightning.data.images import contrasting_colour, overlay
from mit_lightning.errors import UserError
from mit_lightning.inference import InputError, InputTooLarge, Predictor, Sample, answer, read_image
from mit_lightning.serve.batching import DynamicBatcher

STATIC = Path(__file__).parent / "static"
#: how many expressions one segmentation request may ask about
MAX_EXPRESSIONS = 32
#: the endpoint of each task
ENDPOINTS = {"segmentation": "segment", "classification": "classify", "sentiment": "sentiment"}


class SentimentRequest(BaseModel):
    text: str
    sequences: dict[str, Any] = {}


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class BodySizeLimit:
    """Refuse a request body over `max_bytes` with 413 before any of it is parsed.

    The declared Content-Length is checked first; the body is then read here, counting what really
    arrives (chunked uploads declare nothing), and handed on to the application whole.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body"):
                break
        body, delivered = b"".join(chunks), False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send) -> None:
        limit = f"{self.max_bytes / 2**20:.1f} MiB" if self.max_bytes >= 2**20 else f"{self.max_bytes:,} bytes"
        response = error_response(413, f"The upload is larger than the {limit} this server accepts (--max_upload_mb). "
                                       "Send a smaller image.")
        await response(scope, receive, send)


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _overlay_png(image: Image.Image, mask: np.ndarray) -> str:
    return _png(np.asarray(overlay(image, mask, colour=contrasting_colour(image, mask))))


def _segmentation_result(image: Image.Image, expression: str, result: dict[str, Any], probability_map: bool
                         ) -> dict[str, Any]:
    body = {
        "expression": expression,
        "prompt": result["prompt"],
        "foreground": float(result["mask"].mean()),
        "confidence": result["confidence"],
        "mask_png": _png(result["mask"].astype(np.uint8) * 255),
        "overlay_png": _overlay_png(image, result["mask"]),
    }
    if probability_map:
        body["probability_png"] = _png(np.round(result["probability"] * 255).astype(np.uint8))
    return body


def _segmentation_body(image: Image.Image, expressions: list[str], results: list[dict[str, Any]],
                       probability_map: bool = False) -> dict[str, Any]:
    return {
        "width": image.width,
        "height": image.height,
        "results": [_segmentation_result(image, expression, result, probability_map)
                    for expression, result in zip(expressions, results)],
    }


def _validation_message(error: RequestValidationError) -> str:
    """FastAPI's error list as one line: which field, what was wrong."""
    parts = []
    for item in error.errors():
        field = ".".join(str(part) for part in item.get("loc", ()) if part not in ("body", "query", "path"))
        parts.append(f"{field or 'the request'}: {item.get('msg', 'invalid')}")
    return "; ".join(parts) + ". See GET /adapters for what each adapter reads."


def create_app(predictors: dict[str, Predictor], max_batch_size: int = 8, max_wait_ms: float = 10.0,
               max_upload_mb: float = 10.0, show_paths: bool = False) -> FastAPI:
    """The application serving `predictors` (by name; they share one backbone, see `load_adapters`).

    `show_paths`: /adapters gives each adapter's local path, not only its file or folder name. /docs is served
    from files installed with the package (fastapi-offline), so it works without the internet.
    """
    batcher = DynamicBatcher(lambda name, samples: predictors[name].run(samples), max_batch_size, max_wait_ms / 1000)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPIOffline(title="mit-lightning", summary="Trained MiT models on new inputs", lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=int(max_upload_mb * 2**20))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(InputTooLarge)
    async def too_large(_, error: InputTooLarge) -> JSONResponse:
        return error_response(413, str(error))

    @app.exception_handler(UserError)
    async def bad_input(_, error: UserError) -> JSONResponse:
        return error_response(400, str(error))

    @app.exception_handler(RequestValidationError)
    async def bad_fields(_, error: RequestValidationError) -> JSONResponse:
        return error_response(422, _validation_message(error))

    @app.exception_handler(HTTPException)
    async def http_error(_, error: HTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def failure(_, error: Exception) -> JSONResponse:
        first_line = str(error).splitlines()[0] if str(error) else ""
        return error_response(500, f"The model failed on this request ({type(error).__name__}: {first_line}); the "
                                   "server's log has the details.")

    def adapter(name: str, task: str) -> Predictor:
        if name not in predictors:
            raise HTTPException(404, f"No adapter '{name}'; loaded: {', '.join(predictors)} (GET /adapters).")
        predictor = predictors[name]
        if predictor.task != task:
            raise InputError(f"'{name}' does {predictor.task}, not {task}: POST /adapters/{name}/"
                             f"{ENDPOINTS[predictor.task]}.")
        return predictor

    async def image_of(upload: UploadFile) -> Image.Image:
        return await run_in_threadpool(read_image, await upload.read())

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/adapters")
    async def adapters() -> dict[str, Any]:
        return {"adapters": [predictor.describe(paths=show_paths) for predictor in predictors.values()]}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return {**batcher.stats.as_dict(), "max_batch_size": batcher.max_batch_size, "max_wait_ms": max_wait_ms}

    @app.post("/adapters/{name}/segment")
    async def segment(name: str, image: UploadFile = File(...), expression: list[str] = Form(...),
                      probability_map: bool = Form(False)) -> dict[str, Any]:
        predictor = adapter(name, "segmentation")
        if len(expression) > MAX_EXPRESSIONS:
            raise InputTooLarge(f"{len(expression)} expressions in one request; send at most {MAX_EXPRESSIONS}.")
        picture = await image_of(image)
        samples = [predictor.check(Sample(text=text, image=picture)) for text in expression]
        results = [answer(result) for result in await batcher.submit(name, samples)]
        return {"adapter": name, "task": predictor.task,
                **await run_in_threadpool(_segmentation_body, picture, expression, results, probability_map)}

    @app.post("/adapters/{name}/classify")
    async def classify(name: str, image: UploadFile = File(...), text: str = Form(...)) -> dict[str, Any]:
        predictor = adapter(name, "classification")
        sample = predictor.check(Sample(text=text, image=await image_of(image)))
        result = answer((await batcher.submit(name, [sample]))[0])
        ranked = sorted(result["probabilities"].items(), key=lambda item: -item[1])
        return {"adapter": name, "task": predictor.task, "prompt": result["prompt"], "label": result["label"],
                "label_index": result["label_index"],
                "probabilities": [{"label": label, "probability": value} for label, value in ranked]}

    @app.post("/adapters/{name}/sentiment")
    async def sentiment(name: str, request: SentimentRequest) -> dict[str, Any]:
        predictor = adapter(name, "sentiment")
        sample = await run_in_threadpool(predictor.check, Sample(text=request.text, sequences=request.sequences))
        result = answer((await batcher.submit(name, [sample]))[0])
        return {"adapter": name, "task": predictor.task, "prompt": result["prompt"], "score": result["score"]}

    return app

