"""The dispatcher's plain methods (bus/objects.py), with stand-ins for sdbus's messages: the
handler gets only the arguments, its result or error becomes the reply, and WithCaller hands
the call back with its Call."""

from __future__ import annotations

from typing import Any

import pytest

from machined.bus import objects
from machined.bus.objects import Call, Creds, Dispatcher, Method, WithCaller
from machined.core.errors import NoSuchMachine


class Reply:
    def __init__(self, sent: list[tuple[str, tuple[Any, ...]]], kind: str) -> None:
        self.sent, self.kind = sent, kind
        self.data: tuple[Any, ...] = ("",)

    def append_data(self, sig: str, *values: Any) -> None:
        self.data = (sig, *values)

    def send(self) -> None:
        self.sent.append((self.kind, self.data))


class Message:
    def __init__(self, *args: Any, expect_reply: bool = True) -> None:
        self.args = args
        self.expect_reply = expect_reply
        self.sender = ":1.42"
        self.sent: list[tuple[str, tuple[Any, ...]]] = []

    def parse_to_tuple(self) -> tuple[Any, ...]:
        return self.args

    def create_reply(self) -> Reply:
        return Reply(self.sent, "reply")

    def create_error_reply(self, name: str, text: str) -> Reply:
        reply = Reply(self.sent, "error")
        reply.data = (name, text)
        return reply


def plain(handler: Any, out_sig: str = "o", **kw: Any) -> Any:
    dispatcher = Dispatcher.__new__(Dispatcher)
    dispatcher._tasks = set()
    return dispatcher._callback(Method("M", "s", ("name",), out_sig, ("x",), handler,
                                       plain=True, **kw))


def test_plain_handler_gets_the_arguments_and_its_result_is_the_reply() -> None:
    dispatch = plain(lambda name: f"/m/{name}")
    msg = Message("a")
    dispatch(msg)
    assert msg.sent == [("reply", ("o", "/m/a"))]


def test_plain_handler_errors_become_error_replies() -> None:
    def missing(name: str) -> str:
        raise NoSuchMachine(name)

    msg = Message("nope")
    plain(missing)(msg)
    assert msg.sent == [("error", ("org.freedesktop.machine1.NoSuchMachine",
                                   "No machine 'nope' known"))]


def test_plain_call_without_reply_expected_sends_nothing() -> None:
    msg = Message("a", expect_reply=False)
    plain(lambda name: "/m/a")(msg)
    assert msg.sent == []


def test_with_caller_answers_with_the_call() -> None:
    seen: list[Call] = []

    def answer(call: Call) -> str:
        seen.append(call)
        return "/m/mine"

    msg = Message("a")
    plain(lambda name: WithCaller(answer))(msg)
    assert msg.sent == [("reply", ("o", "/m/mine"))]
    assert seen[0].msg is msg  # type: ignore[comparison-overlap]  # a stand-in
    assert seen[0].sender == ":1.42"


def test_with_caller_may_wait() -> None:
    async def answer(call: Call) -> str:
        return "/m/later"

    msg = Message("a")
    plain(lambda name: WithCaller(answer))(msg)
    assert msg.sent == [("reply", ("o", "/m/later"))]  # finished without waiting: no task


def test_plain_methods_return_one_value_and_no_fds() -> None:
    with pytest.raises(ValueError, match="one value, not fds"):
        plain(lambda name: 3, out_sig="h")
    dispatcher = Dispatcher.__new__(Dispatcher)
    with pytest.raises(ValueError, match="one value, not fds"):
        dispatcher._callback(Method("M", "s", ("name",), "ss", ("a", "b"), lambda n: ("", ""),
                                    plain=True))


def test_the_credentials_of_the_most_recent_callers_are_kept(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objects, "CREDS_KEPT", 3)
    dispatcher = Dispatcher.__new__(Dispatcher)
    dispatcher._creds = {}
    for i in range(5):
        dispatcher._remember_creds(f":1.{i}", {"UnixUserID": ("u", 1000 + i),
                                               "ProcessID": ("u", 10 + i)})
    assert list(dispatcher._creds) == [":1.2", ":1.3", ":1.4"]
    assert dispatcher.creds_now(":1.4") == Creds(uid=1004, pid=14)  # cached: no bus asked
