"""The HTTP API's request and response bodies (FastAPI validates requests against them and documents them at
/docs)."""

from typing import Literal

from pydantic import BaseModel, Field

Mode = Literal["dense", "sparse", "hybrid"]
MODE = "dense: the DPR index; sparse: BM25; hybrid: both, fused by reciprocal rank (default: serve.mode)"


class SearchRequest(BaseModel):
    questions: list[str] = Field(min_length=1, description="questions to retrieve passages for")
    k: int = Field(10, ge=1, description="passages per question (at most serve.max_k)")
    mode: Mode | None = Field(None, description=MODE)


class Passage(BaseModel):
    id: str
    title: str
    text: str
    score: float


class SearchResponse(BaseModel):
    index_version: str
    results: list[list[Passage]]


class AskRequest(BaseModel):
    question: str = Field(min_length=1, description="the question to answer")
    k: int = Field(10, ge=1, description="passages to retrieve (at most serve.max_k)")
    top_answers: int = Field(3, ge=1, le=20, description="answer spans to return, best first")
    mode: Mode | None = Field(None, description=MODE)


class Answer(BaseModel):
    text: str
    score: float
    passage_id: str
    title: str
    start: int
    end: int


class AskResponse(BaseModel):
    answers: list[Answer]
    passages: list[Passage]
    index_version: str
