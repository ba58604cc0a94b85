import msgpack
import pytest
import torch

from router.errors import PlacementError
from router.placement import PlacementTable


def test_even_contiguous_blocks() -> None:
    table = PlacementTable.even(8, 2)
    assert table.experts_of(0) == [0, 1, 2, 3]
    assert table.experts_of(1) == [4, 5, 6, 7]
    assert table.workers_of(5) == [1]
    assert table.num_experts == 8 and table.version == 0


def test_even_uneven_split_covers_every_expert_once() -> None:
    table = PlacementTable.even(10, 4)
    sizes = [len(table.experts_of(w)) for w in range(4)]
    assert sum(sizes) == 10 and max(sizes) - min(sizes) <= 1
    assert sorted(e for w in range(4) for e in table.experts_of(w)) == list(range(10))


def test_even_replicas_go_to_next_workers() -> None:
    table = PlacementTable.even(8, 4, replicas=2)
    assert table.workers_of(0) == [0, 1]
    assert table.workers_of(7) == [3, 0]
    assert table.experts_of(0) == [0, 1, 6, 7]


def test_choose_single_replica_is_the_owner() -> None:
    table = PlacementTable.even(8, 2)
    ids = torch.tensor([[0, 7], [4, 3], [5, 5]])
    assert table.choose(ids).tolist() == [[0, 1], [1, 0], [1, 1]]


def test_choose_spreads_tokens_over_replicas_by_token_index() -> None:
    table = PlacementTable(num_workers=3, replicas=((0, 2), (1,)))
    ids = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1]])
    assert table.choose(ids).tolist() == [[0, 1], [2, 1], [0, 1], [2, 1]]
    assert table.choose(torch.empty(0, 2, dtype=torch.int64)).shape == (0, 2)


@pytest.mark.parametrize("table", [PlacementTable.even(8, 2), PlacementTable(num_workers=3, replicas=((0, 2), (1,)))])
def test_pair_workers_is_choose_flattened(table: PlacementTable) -> None:
    ids = torch.tensor([[0, 1], [1, 0], [0, 0]]) % table.num_experts
    assert table.pair_workers(ids).tolist() == table.choose(ids).reshape(-1).tolist()


@pytest.mark.parametrize("bad", [8, -1])
def test_choose_rejects_unknown_expert(bad: int) -> None:
    table = PlacementTable.even(8, 2)
    for choose in (table.choose, table.pair_workers):
        with pytest.raises(PlacementError, match="topk_ids outside 0..7"):
            choose(torch.tensor([[0, bad]]))


def test_dict_round_trip_through_msgpack() -> None:
    table = PlacementTable(num_workers=3, replicas=((0, 2), (1,), (2,)), version=7)
    again = PlacementTable.from_dict(msgpack.unpackb(msgpack.packb(table.to_dict())))
    assert again == table
    assert again.choose(torch.tensor([[0], [0]])).tolist() == [[0], [2]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_workers": 2, "replicas": ((0,), ())}, "expert 1 has no replica"),
        ({"num_workers": 2, "replicas": ((0,), (2,))}, r"expert 1 is placed on worker\(s\) \[2\], outside 0..1"),
        ({"num_workers": 2, "replicas": ((-1,),)}, "outside 0..1"),
        ({"num_workers": 2, "replicas": ((1, 1),)}, "lists a worker twice"),
        ({"num_workers": 0, "replicas": ((0,),)}, "num_workers must be >= 1"),
        ({"num_workers": 2, "replicas": ()}, "no experts"),
        ({"num_workers": 2, "replicas": ((0,),), "version": -1}, "version must be >= 0"),
    ],
)
def test_validation_names_the_problem(kwargs: dict, message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        PlacementTable(**kwargs)


def test_even_validation() -> None:
    with pytest.raises(PlacementError, match="replicas must be in 1..num_workers"):
        PlacementTable.even(8, 2, replicas=3)
    with pytest.raises(PlacementError, match="num_experts >= 1"):
        PlacementTable.even(0, 2)


def test_from_dict_missing_field() -> None:
    with pytest.raises(PlacementError, match=r"lacks field\(s\) \['replicas'\]"):
        PlacementTable.from_dict({"version": 1, "num_workers": 2})


def test_lookups_reject_unknown_ids() -> None:
    table = PlacementTable.even(4, 2)
    with pytest.raises(PlacementError, match="worker 2"):
        table.experts_of(2)
    with pytest.raises(PlacementError, match="expert 4"):
        table.workers_of(4)
