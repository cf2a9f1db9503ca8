"""The login throttle's bookkeeping (:class:`~llava_local.apps.ui_logins.LoginAttempts`),
on a clock the test moves; its HTTP side is in tests/security/test_ui_login.py."""

from __future__ import annotations

import pytest

from llava_local.apps.ui_logins import LoginAttempts


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def fail(attempts: LoginAttempts, client: str, times: int) -> None:
    for _ in range(times):
        assert attempts.begin(client) is None
        attempts.end(client, succeeded=False)


def test_failures_past_the_limit_wait_until_the_oldest_is_a_window_old(clock: Clock) -> None:
    attempts = LoginAttempts(failures=3, window=60, clock=clock)
    fail(attempts, "10.0.0.1", 2)
    clock.now += 20
    fail(attempts, "10.0.0.1", 1)
    assert attempts.begin("10.0.0.1") == pytest.approx(40)  # the first failure, 20 s ago
    assert attempts.begin("10.0.0.2") is None  # another address is not held back
    clock.now += 40
    assert attempts.begin("10.0.0.1") is None  # one failure left the window


def test_a_success_clears_the_failures(clock: Clock) -> None:
    attempts = LoginAttempts(failures=3, window=60, clock=clock)
    fail(attempts, "10.0.0.1", 2)
    assert attempts.begin("10.0.0.1") is None
    attempts.end("10.0.0.1", succeeded=True)
    fail(attempts, "10.0.0.1", 2)
    assert attempts.begin("10.0.0.1") is None


def test_logins_still_running_count_so_a_burst_is_bounded(clock: Clock) -> None:
    attempts = LoginAttempts(failures=3, window=60, clock=clock)
    assert [attempts.begin("10.0.0.1") for _ in range(3)] == [None, None, None]
    assert attempts.begin("10.0.0.1") == 60  # none has failed yet: a whole window
    attempts.end("10.0.0.1", succeeded=True)
    assert attempts.begin("10.0.0.1") is None  # a running one ended, and cleared


def test_an_ipv6_client_counts_by_its_64_network(clock: Clock) -> None:
    attempts = LoginAttempts(failures=2, window=60, clock=clock)
    fail(attempts, "2001:db8:1:2::1", 1)
    fail(attempts, "2001:db8:1:2:ffff::9", 1)  # the same /64, another host
    assert attempts.begin("2001:db8:1:2::abcd") is not None
    assert attempts.begin("2001:db8:1:3::1") is None  # the next /64
    fail(attempts, "::ffff:10.0.0.7", 2)  # an IPv4 client on a dual-stack socket
    assert attempts.begin("10.0.0.7") is not None


def test_the_addresses_remembered_are_bounded(clock: Clock) -> None:
    attempts = LoginAttempts(failures=1, window=60, clients=3, clock=clock)
    for i in range(5):
        fail(attempts, f"10.0.0.{i}", 1)
    assert attempts.begin("10.0.0.4") is not None  # the latest are remembered
    assert attempts.begin("10.0.0.0") is None  # the longest quiet was forgotten
