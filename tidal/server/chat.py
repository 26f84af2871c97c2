"""Turning an OpenAI-style conversation into one Moondream 3 skill call.

The last user message is the request: its text picks the skill by prefix
(`query:`, `reason:`, `caption: short|normal|long`, `detect:`, `point:`, or
`detect <object>` / `point <object>`); any other text is a query, and an
image with no text is a normal caption. Moondream 3 has no multi-turn
format, so earlier turns are not part of the prompt; one image at most.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tidal.errors import InvalidRequestError
from tidal.server.schemas import ImagePart, Message, TextPart

SKILLS = ("query", "reason", "caption", "detect", "point")
_PREFIX = re.compile(r"^\s*(query|reason|caption|detect|point):[ \t]*(.*)$", re.S)
_BARE = re.compile(r"^\s*(detect|point)\s+(\S.*)$", re.S)
# A lowercase word and a colon at the very start reads as a skill prefix.
_LOOKS_LIKE_PREFIX = re.compile(r"^\s*([a-z_]{3,16}):")


@dataclass
class ChatTask:
    skill: str  # one of SKILLS
    text: str  # question, object, or caption length
    image_url: str | None


def _parts(msg: Message) -> tuple[list[str], list[str]]:
    if msg.content is None:
        return [], []
    if isinstance(msg.content, str):
        return [msg.content], []
    texts = [p.text for p in msg.content if isinstance(p, TextPart)]
    images = [p.image_url if isinstance(p.image_url, str) else p.image_url.url for p in msg.content if isinstance(p, ImagePart)]
    return texts, images


def route(messages: list[Message], reasoning: bool | None = None) -> ChatTask:
    users = [m for m in messages if m.role == "user"]
    if not users:
        raise InvalidRequestError("messages need a user message")
    images = [url for m in users for url in _parts(m)[1]]
    if len(images) > 1:
        raise InvalidRequestError(f"Moondream 3 takes one image per request; got {len(images)}")
    image = images[0] if images else None
    text = "\n".join(_parts(users[-1])[0]).strip()
    if not text:
        if image is None:
            raise InvalidRequestError("the last user message has neither text nor an image")
        return ChatTask("caption", "normal", image)
    match = _PREFIX.match(text) or _BARE.match(text)
    if match:
        skill, rest = match.group(1), match.group(2).strip()
        if skill == "caption":
            rest = rest or "normal"
        elif skill == "query" and reasoning:
            skill = "reason"
    else:
        unknown = _LOOKS_LIKE_PREFIX.match(text)
        if unknown:
            raise InvalidRequestError(
                f"unknown skill prefix {unknown.group(1)!r}: use one of {', '.join(s + ':' for s in SKILLS)} "
                "(to ask a question that starts this way, begin with 'query: ')"
            )
        skill, rest = ("reason" if reasoning else "query"), text
    if skill in ("caption", "detect", "point") and image is None:
        raise InvalidRequestError(f"{skill} needs an image")
    return ChatTask(skill, rest, image)
