"""Broadcast messages: each transport's frame, built once and shared."""

from coordinator_core.broadcast import Broadcaster, Message, encode


def test_frames_of_every_transport():
    m = encode("event", {"data": {"a": 1}}, "s", 7)
    assert (m.type, m.session_id, m.cursor) == ("event", "s", 7)
    assert m.ws_frame == '{"type":"event","data":{"a":1}}'
    assert m.ws_frame_cursor == '{"type":"event","data":{"a":1},"cursor":7}'
    assert m.sse_frame == b'id: 7\nevent: event\ndata: {"data":{"a":1}}\n\n'
    assert m.ws_frame is m.ws_frame  # built once
    empty = Message("session_deleted", None, 3, b"{}")
    assert (empty.ws_frame, empty.ws_frame_cursor) == ('{"type":"session_deleted"}', '{"type":"session_deleted","cursor":3}')


def test_one_init_message_while_list_and_cursor_stay():
    b = Broadcaster(read_page=None)
    listed = b'{"sessions":[{"session_id":"a"}]}'
    first = b.init_message(listed, 5)
    assert first.ws_frame == '{"type":"init","sessions":[{"session_id":"a"}]}'
    assert b.init_message(bytes(listed), 5) is first  # an equal list: the same message
    assert b.init_message(listed, 6) is not first  # a new cursor
    changed = b.init_message(b'{"sessions":[]}', 6)
    assert changed.ws_frame == '{"type":"init","sessions":[]}' and changed.cursor == 6
