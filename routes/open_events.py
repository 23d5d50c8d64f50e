"""Open events: an event keeps every top-level key its client sent beyond the known ones.

The body is decoded into the `Event` Struct as before, then once more into its top-level keys
with their values left undecoded (msgspec.Raw); the keys beyond the known ones become one JSON
object, their values byte for byte as sent (`models.extra_json`). That second pass costs about
2 µs of CPU for a typical event.
"""

from __future__ import annotations

import msgspec

from store.models import Event, extra_json

_fields = msgspec.json.Decoder(dict[str, msgspec.Raw])
_event = msgspec.json.Decoder(Event)


def raw_fields(body: bytes) -> dict[str, msgspec.Raw]:
    """The top-level keys of a JSON object, their values undecoded."""
    return _fields.decode(body)


class EventDecoder:
    """A decoder for `routes.common.read_body`: `decode(body)` gives `(Event, extra)`."""

    def decode(self, body: bytes) -> tuple[Event, str | None]:
        event = _event.decode(body)
        return event, extra_json(raw_fields(body))
