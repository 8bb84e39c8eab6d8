"""The Triton model's request state: a cancellation question and the final response never overlap.

Triton frees a request's response sender when its final response goes out, and asking a freed
sender whether the request was cancelled crashes the server (seen under load as a segfault in
TRITONBACKEND_ResponseFactoryIsCancelled). The sender here records the order of events."""

import threading

from nemodiff.serving.triton.requests import RequestState


class Sender:
    def __init__(self, answer: bool = False, fail: bool = False):
        self.answer, self.fail = answer, fail
        self.asking, self.release = threading.Event(), threading.Event()
        self.events: list[str] = []

    def is_cancelled(self) -> bool:
        self.events.append("ask")
        self.asking.set()
        self.release.wait(5)
        self.events.append("answered")
        if self.fail:
            raise RuntimeError("the request is gone")
        return self.answer


def new_state(sender: Sender) -> RequestState:
    state = RequestState(sender, stream=True, mode="ar", num_input_tokens=3, echo_prefix="")
    state.handles = [object()]
    return state


def test_the_final_waits_for_a_question_under_way():
    sender = Sender()
    state = new_state(sender)
    asker = threading.Thread(target=state.cancelled)
    asker.start()
    assert sender.asking.wait(5)

    def finish():
        if state.claim_final():
            sender.events.append("final")

    finisher = threading.Thread(target=finish)
    finisher.start()
    finisher.join(0.2)
    assert finisher.is_alive()  # blocked: the question is not answered yet
    sender.release.set()
    asker.join(5)
    finisher.join(5)
    assert sender.events == ["ask", "answered", "final"]


def test_nobody_asks_after_the_final_is_claimed():
    sender = Sender(answer=True)
    sender.release.set()
    state = new_state(sender)
    assert state.claim_final()
    assert not state.claim_final()  # one final response per request
    assert state.cancelled() is False
    assert sender.events == []


def test_answers():
    sender = Sender(answer=True)
    sender.release.set()
    assert new_state(sender).cancelled() is True
    gone = Sender(fail=True)
    gone.release.set()
    assert new_state(gone).cancelled() is True  # an error asking means the request is gone
    unsubmitted = RequestState(Sender(), stream=False, mode="ar", num_input_tokens=1, echo_prefix="")
    assert unsubmitted.cancelled() is False  # not yet submitted to the engine: nothing to cancel
