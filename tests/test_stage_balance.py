"""The layer split suggested from measured stage times."""
from raypp.runtime.stage_balance import suggest_stage_layers


def test_balanced_stages_need_no_new_split():
    assert suggest_stage_layers([4, 4], [10.0, 10.5]) is None


def test_a_slow_last_stage_moves_layers_forward():
    # 1 ms per layer; the last stage also pays 2 ms for its head: 4 + (4 + 2) -> 5 + (3 + 2).
    assert suggest_stage_layers([4, 4], [4.0, 6.0]) == [5, 3]


def test_a_bad_manual_split_is_undone():
    assert suggest_stage_layers([1, 7], [1.0, 7.0]) == [4, 4]
    assert suggest_stage_layers([2, 1, 5], [2.0, 1.0, 5.0]) == [3, 3, 2]
