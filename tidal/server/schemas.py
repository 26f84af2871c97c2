"""Request bodies. Values are checked by the Python API, so the server and
`tidal.Moondream` reject bad input with the same messages."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict

from tidal.validation import MAX_TEXT_CHARS, check_text


def _text(value: str) -> str:
    return check_text(value, "text", MAX_TEXT_CHARS, allow_empty=True)


# Any string a client sends: bounded, valid Unicode (a lone surrogate is a 400, not a 500).
Text = Annotated[str, AfterValidator(_text)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients may send fields we do not use (e.g. model)


# -- Moondream API (the `moondream` client's JSON) --------------------------------------
class CaptionBody(_Body):
    image_url: str
    length: Text = "normal"
    stream: bool = False
    settings: dict[str, Any] | None = None


class QueryBody(_Body):
    question: Text
    image_url: str | None = None
    reasoning: bool = False  # Moondream's API: absent means no reasoning
    spatial_refs: Any = None
    stream: bool = False
    settings: dict[str, Any] | None = None


class LocateBody(_Body):
    image_url: str
    object: Text
    settings: dict[str, Any] | None = None
    spatial_refs: Any = None  # sent by the client for point; Moondream 3 cannot use it


# -- OpenAI chat completions -------------------------------------------------------------
class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: Union[ImageURL, str]


class VideoURL(BaseModel):
    url: str


class VideoPart(BaseModel):
    """A video as an animated image (GIF, WebP or PNG; a data URL or an allowed
    local file): its frames and their timing (vLLM's video_url part)."""

    type: Literal["video_url"]
    video_url: Union[VideoURL, str]


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[Text, list[Union[TextPart, ImagePart, VideoPart]], None] = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Generation(_Body):
    """What OpenAI's chat and completion bodies share: model, streaming, sampling,
    and options accepted only to be refused with a clear 400 when used (never ignored)."""

    model: Text | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: Union[Text, list[Text], None] = None
    seed: int | None = None
    n: int = 1
    logit_bias: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class ChatBody(_Generation):
    messages: list[Message]
    max_completion_tokens: int | None = None
    reasoning: bool | None = None  # the moondream client's chat() sends this
    # Accepted only to be refused with a clear 400 when used (never ignored):
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None


class CompletionBody(_Generation):
    """OpenAI `POST /v1/completions` (models served through tidal.LLM)."""

    prompt: Union[Text, list[int]]
    ignore_eos: bool = False
    logprobs: int | None = None
    echo: bool = False
