"""The one-time hand-over of a new secret from a form's POST to the GET its redirect opens."""

from __future__ import annotations

from quotagate.web.handover import Handover, Made


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def made(n: int) -> Made:
    return Made(name=f"key-{n}", prefix="qgk_abcd…", secret=f"qgk_secret_{n}", title="Your new key")


def test_taken_once_by_its_session_for_its_page() -> None:
    h = Handover()
    h.put("tok_a", "/projects/p/keys", made(1))
    assert h.take("tok_b", "/projects/p/keys") is None  # another session
    assert h.take("tok_a", "/projects/q/keys") is None  # another page
    assert h.take("tok_a", "/projects/p/keys") == made(1)
    assert h.take("tok_a", "/projects/p/keys") is None  # shown once: a reload gets nothing
    assert len(h) == 0


def test_two_made_at_once_are_both_shown_oldest_first() -> None:
    h = Handover()
    h.put("tok_a", "/tokens", made(1))
    h.put("tok_a", "/tokens", made(2))
    assert [h.take("tok_a", "/tokens"), h.take("tok_a", "/tokens"), h.take("tok_a", "/tokens")] == \
        [made(1), made(2), None]


def test_unshown_secrets_expire_and_memory_is_bounded() -> None:
    clock = Clock()
    h = Handover(ttl=60, max_pending=3, clock=clock)
    h.put("tok_a", "/tokens", made(1))
    clock.now += 61
    assert h.take("tok_a", "/tokens") is None
    assert len(h) == 0
    for n in range(5):
        h.put(f"tok_{n}", "/tokens", made(n))
    assert len(h) == 3
    assert h.take("tok_0", "/tokens") is None and h.take("tok_1", "/tokens") is None  # the oldest went first
    assert h.take("tok_4", "/tokens") == made(4)


def test_the_secret_stays_out_of_reprs() -> None:
    assert "qgk_secret_1" not in repr(made(1))
    assert "qgk_secret_1" not in str(made(1))
