"""The one coalescing rule the gateway and the reconstruction share."""

from services.common.updates import coalesced


def test_the_due_come_in_arrival_order_and_the_rest_stay_in_theirs() -> None:
    updates = [(1, 0), (2, 7), (3, 0), (4, 3), (5, 0)]  # (update_id, at_iteration)
    soon, later = coalesced(updates, lambda u: u[1] == 0)
    assert soon == [(1, 0), (3, 0), (5, 0)] and soon[-1] == (5, 0)  # the one that matters
    assert later == [(2, 7), (4, 3)]
    due, pending = coalesced(updates, lambda u: u[1] <= 3)
    assert due[-1] == (5, 0) and pending == [(2, 7)]
    assert coalesced([], lambda u: True) == ([], [])
