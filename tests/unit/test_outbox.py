"""The stream model's outbox: text waiting for one request is joined when the sender is behind."""

from __future__ import annotations

import threading

from vlm_engine.output import Result
from vlm_engine.scheduler import Event
from vlm_triton.outbox import Outbox, coalesce

A, B = object(), object()
DONE = Result("ok", 2, "stop")


def test_waiting_text_of_one_request_becomes_one_response_in_order():
    items = [(A, True, Event("a1")), (B, True, Event("b1")), (A, True, Event("a2")), (B, True, Event(result=DONE))]
    items += [(A, True, Event("a3")), (A, True, Event(result=DONE)), (A, True, Event("late"))]
    out = coalesce(items)
    assert [(s is A, e.text, e.final) for s, _, e in out] == [
        (True, "a1a2a3", False),
        (False, "b1", False),
        (False, "", True),
        (True, "", True),
        (True, "late", False),  # nothing merges across a final event
    ]


def test_a_sender_that_keeps_up_sends_every_event_and_one_behind_sends_fewer():
    outbox = Outbox()
    sent: list = []
    gate = threading.Event()

    def send(item) -> None:
        gate.wait()  # the first send blocks: the sender is behind while 50 events arrive
        sent.append(item)

    thread = threading.Thread(target=outbox.drain, args=(send,))
    thread.start()
    outbox.put((A, True, Event("x")))
    while outbox.sent_events == 0:
        pass
    for i in range(50):
        outbox.put((A, True, Event(str(i % 10))))
    outbox.put((A, True, Event(result=DONE)))
    gate.set()
    outbox.close()
    thread.join(5)
    assert "".join(e.text for _, _, e in sent) == "x" + "".join(str(i % 10) for i in range(50))
    assert sent[-1][2].final and outbox.sent_events == 52
    assert outbox.sent_responses < 10, "the 50 events that waited went out as one or a few responses"
