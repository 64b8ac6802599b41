"""Request and response bodies of the top-k server (pydantic 2); FastAPI derives the OpenAPI schema from them.

Types are strict (a string is never coerced to a number or a bool) and unknown keys are refused, so a
malformed body gets a 422 naming the field instead of a silently different query. Raw ids are JSON strings
or integers, as in the training data; the server converts them to the kind its vocabularies hold.
"""
from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

RawId = Union[StrictStr, StrictInt]

MAX_LIST = 10_000          # ids / items per request: bounded work per call
MAX_CONDITIONS = 64        # condition values per request: one user-tower row and one search each
MAX_EMBEDDING_VALUE = 1e4  # larger coordinates could overflow float32 dot products into inf scores


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TopKRequest(_Body):
    """A query: a known user, or an unknown one described by features and/or recent items."""
    user_id: RawId | None = Field(None, description="raw user id; null or unknown = describe the user below")
    features: dict[str, Any] | None = Field(None, description="raw user feature values by feature name")
    history: list[RawId] | None = Field(None, max_length=MAX_LIST,
                                        description="raw item ids the user interacted with, most recent first")
    k: StrictInt = Field(..., ge=1, description="number of items to return, in [1, corpus size]")
    exclude: list[RawId] | None = Field(None, max_length=MAX_LIST, description="raw item ids never to return")
    exclude_seen: StrictBool = Field(False, description="also exclude the user's training items (known users) "
                                                        "and the given history")
    condition: RawId | list[RawId] | None = Field(
        None, description="conditional models (model.user.condition) only: one value, or a list of up to "
                          f"{MAX_CONDITIONS} values, of the condition feature (e.g. a genre). Only items with the "
                          "value are returned; for several values, each value's list (the user embedded with "
                          "that value) merged round-robin without duplicates, `k` filled whenever the values hold "
                          "k eligible items together. null = unconditioned (the tower fed no condition)")


class ScoredItem(BaseModel):
    id: RawId
    score: float


class TopKResponse(BaseModel):
    items: list[ScoredItem] = Field(..., description="best first; fewer than k only when exclusions leave "
                                                     "fewer items. For a model with several embeddings per user, "
                                                     "the searched embeddings' lists merged round-robin without "
                                                     "duplicates, each item scored by the embedding it came from")
    model_version: str
    index_version: str
    interests: int | None = Field(None, ge=1, description="models with several embeddings per user "
                                                          "(model.user.num_embeddings > 1) only: how many of the "
                                                          "user's embeddings were searched (K', from the history "
                                                          "length); absent for a single-embedding model")


class ItemIn(_Body):
    """An item to upsert: either raw features (through the item tower) or a ready embedding."""
    id: RawId
    features: dict[str, Any] | None = None
    embedding: list[StrictFloat | StrictInt] | None = Field(None, max_length=4096)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.features is None) == (self.embedding is None):
            raise ValueError("give exactly one of features or embedding for each item")
        if self.embedding is not None and any(abs(v) > MAX_EMBEDDING_VALUE for v in self.embedding):
            raise ValueError(f"embedding values must lie within +-{MAX_EMBEDDING_VALUE:g}")
        return self


class UpsertRequest(_Body):
    items: list[ItemIn] = Field(..., min_length=1, max_length=MAX_LIST)


class UpsertResponse(BaseModel):
    upserted: int
    index_size: int
    index_version: str


class DeleteRequest(_Body):
    ids: list[RawId] = Field(..., min_length=1, max_length=MAX_LIST)


class DeleteResponse(BaseModel):
    deleted: int
    index_size: int
    index_version: str


class ReloadRequest(_Body):
    index_dir: StrictStr = Field(..., min_length=1, max_length=4096,
                                 description="an index directory under the server's reload_root, absolute or "
                                             "relative to it")


class ReloadResponse(BaseModel):
    index_dir: str
    index_size: int
    model_version: str
    index_version: str


class Health(BaseModel):
    status: str
    model_version: str
    index_version: str
    index_size: int


class ErrorBody(BaseModel):
    detail: str | list[str]
