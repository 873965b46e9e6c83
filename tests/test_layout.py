"""One layout type and one set of TP rules, torch-free, for the runtime and the planner alike."""
import subprocess
import sys

import pytest

from raypp.errors import LayoutError
from raypp.layout import Layout, tp_problems, valid_tp
from raypp.model.config import ModelConfig
from raypp.parallel.layout import make_layout
from raypp.planner import strategy


def test_the_rules_and_the_type_are_importable_without_torch():
    code = ("import sys, raypp.layout, raypp.planner.strategy, raypp.runtime.scheduler, raypp.runtime.stats; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_runtime_and_planner_reject_the_same_tp_for_the_same_reason(tiny_ckpt):
    cfg = ModelConfig.from_dir(tiny_ckpt)
    assert strategy.tp_problems is tp_problems
    ok = valid_tp(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size)
    assert ok == [1, 2, 4, 8, 16]
    with pytest.raises(LayoutError) as err:
        make_layout(cfg, 3, 1)
    assert str(err.value).startswith("; ".join(tp_problems(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, 3)))
    assert f"tp values that work for this model: {ok}" in str(err.value)


def test_rank_arithmetic_and_names():
    lay = Layout(2, 3, (3, 3, 2), replicas=2)
    assert lay.world_size == 6 and lay.rank(2, 1) == 5 and list(lay.layers_of(1)) == [3, 4, 5]
    assert lay.name == "TP2xPP3 x2" and lay.stage_node(2, 4) == 1 and lay.micro_batches(2, None) == 2
