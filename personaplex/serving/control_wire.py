"""Messages on the control socket between a front-end process and the engine process.

A message is an 8-byte header (two big-endian uint32: the JSON part's length, the raw part's length), a
UTF-8 JSON object, then raw bytes (an uploaded voice sample; usually none). Never pickle: a front-end
process serves the internet, and what it sends the engine is read as data, with every length bounded
before it is read and every field checked by its reader (``field``).
"""

from __future__ import annotations

import asyncio
import json
import struct

from ..errors import PersonaplexError

_HEADER = struct.Struct("!II")
# A persona's text prompt travels here: above the largest client message that can carry one (a 1 MiB Realtime
# event), far above the longest prompt that fits the context. The sender checks it too (a message it may
# not send is refused to its caller, not sent to end the connection).
MAX_JSON_BYTES = 4 << 20


class ControlProtocolError(PersonaplexError):
    """A malformed or oversized control message: the connection that sent it is closed."""


async def read_message(reader: asyncio.StreamReader, max_raw_bytes: int) -> tuple[dict, bytes] | None:
    """The next message (its JSON object and raw bytes); None at a clean end of stream. Raises
    ``ControlProtocolError`` for a message out of bounds or not a JSON object."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ControlProtocolError("the connection ended inside a message header") from None
    json_length, raw_length = _HEADER.unpack(header)
    if json_length > MAX_JSON_BYTES or raw_length > max_raw_bytes:
        raise ControlProtocolError(f"message of {json_length} + {raw_length} bytes is over the limit "
                                   f"({MAX_JSON_BYTES} + {max_raw_bytes})")
    try:
        text = await reader.readexactly(json_length)
        raw = await reader.readexactly(raw_length) if raw_length else b""
    except asyncio.IncompleteReadError:
        raise ControlProtocolError("the connection ended inside a message") from None
    try:
        message = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ControlProtocolError(f"message is not UTF-8 JSON ({exc})") from None
    if not isinstance(message, dict) or not isinstance(message.get("t"), str):
        raise ControlProtocolError("message is not a JSON object with a string 't' (its type)")
    return message, raw


def encode_message(message: dict, raw: bytes = b"") -> bytes:
    """One message ready to write (``message`` must hold JSON types only)."""
    text = json.dumps(message, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode("utf-8")
    return _HEADER.pack(len(text), len(raw)) + text + raw


def field(message: dict, name: str, kind: type | tuple[type, ...], *, optional: bool = False):
    """``message[name]`` if it has type ``kind`` (bool is not an int here); raises ``ControlProtocolError``."""
    if name not in message or message[name] is None:
        if optional:
            return None
        raise ControlProtocolError(f"message {message.get('t')!r} lacks {name!r}")
    value = message[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ControlProtocolError(f"message {message.get('t')!r}: {name!r} has the wrong type")
    return value
