"""Open events: an event keeps every top-level key its client sent beyond the known ones.

The body is decoded into the `Event` Struct as before, then once more into its top-level keys
with their values left undecoded (msgspec.Raw); the keys beyond the known ones become one JSON
object, their values byte for byte as sent. That second pass costs about 2 µs for a typical
event (README, "Sessions and events API").
"""

from __future__ import annotations

from typing import Iterable

import msgspec

from models import Event, EventRow

# `id` too: it is the stored event's own key in the answers.
KNOWN_KEYS = frozenset(EventRow.__struct_fields__)

_fields = msgspec.json.Decoder(dict[str, msgspec.Raw])
_event = msgspec.json.Decoder(Event)


def raw_fields(body: bytes) -> dict[str, msgspec.Raw]:
    return _fields.decode(body)


def extra_json(fields: dict[str, msgspec.Raw], skip: Iterable[str] = ()) -> str | None:
    """The keys of `fields` beyond the known ones (and `skip`) as one JSON object, in the order
    sent; None when there are none. A string that is not UTF-8 raises UnicodeDecodeError."""
    if fields.keys() <= KNOWN_KEYS:
        return None
    extra = {key: value for key, value in fields.items() if key not in KNOWN_KEYS and key not in skip}
    return msgspec.json.encode(extra).decode() if extra else None


class EventDecoder:
    """A decoder for `routes.common.read_body`: `decode(body)` gives `(Event, extra)`."""

    def decode(self, body: bytes) -> tuple[Event, str | None]:
        event = _event.decode(body)
        return event, extra_json(raw_fields(body))
