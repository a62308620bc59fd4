"""The yardstick of ``api_load.py``: a bare FastAPI app with the same request shapes and no work."""

from __future__ import annotations

import uuid

from fastapi import FastAPI
from pydantic import BaseModel, Field

app = FastAPI()


class Body(BaseModel):
    n: int = Field(ge=1)
    label: str | None = None
    seed: int | None = None


@app.post("/bare", status_code=202)
def create(body: Body) -> dict[str, object]:
    return {"id": uuid.uuid4().hex, "status": "queued", "params": body.model_dump()}


@app.get("/bare/{item_id}")
def read(item_id: str) -> dict[str, object]:
    return {"id": item_id, "status": "queued"}
