"""Request bodies. Values are checked by the Python API, so the server and
`tidal.Moondream` reject bad input with the same messages."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients may send fields we do not use (e.g. model)


# -- Moondream API (the `moondream` client's JSON) --------------------------------------
class CaptionBody(_Body):
    image_url: str
    length: str = "normal"
    stream: bool = False
    settings: dict[str, Any] | None = None


class QueryBody(_Body):
    question: str
    image_url: str | None = None
    reasoning: bool = False  # Moondream's API: absent means no reasoning
    spatial_refs: Any = None
    stream: bool = False
    settings: dict[str, Any] | None = None


class LocateBody(_Body):
    image_url: str
    object: str
    settings: dict[str, Any] | None = None
    spatial_refs: Any = None  # sent by the client for point; Moondream 3 cannot use it


# -- OpenAI chat completions -------------------------------------------------------------
class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: Union[ImageURL, str]


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[Union[TextPart, ImagePart]], None] = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatBody(_Body):
    model: str | None = None
    messages: list[Message]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    n: int = 1
    reasoning: bool | None = None  # the moondream client's chat() sends this
