"""Config keys of issue 8: cobla gap-closing options, warm start, decompose.spectrum."""

from __future__ import annotations

import pytest

from coblax.app.config import ConfigError, load_run_config
from coblax.app.experiment import COBLA_KEYS
from coblax.lowrank.cobla import COBLA

BASE = """
methods = ["cobla"]
[cobla]
{cobla}
[decompose]
{decompose}
"""


def _load(tmp_path, cobla="", decompose=""):
    path = tmp_path / "cfg.toml"
    path.write_text(BASE.format(cobla=cobla, decompose=decompose))
    return load_run_config(path)


def test_new_keys_parse_and_reach_the_allocator(tmp_path):
    cfg = _load(tmp_path, 'monotone = true\ncontinuation = [0.1, 1.0]\nlocal_search = 5\nselect = "loss"\n'
                'mask_values = "plain"\nwarm_start = "pos_greedy"', 'spectrum = "whitened"')
    assert cfg.decompose.spectrum == "whitened"
    options = {k: getattr(cfg.cobla, k) for k in COBLA_KEYS}
    alloc = COBLA(**options)
    assert alloc.continuation == (0.1, 1.0) and alloc.monotone and alloc.select == "loss"
    cfg = _load(tmp_path, 'extra_warm_starts = ["lc", "constant"]')
    assert COBLA(**{k: getattr(cfg.cobla, k) for k in COBLA_KEYS}).extra_warm_starts == ("lc", "constant")


@pytest.mark.parametrize(
    "cobla,decompose,message",
    [
        ('warm_start = "cobla"', "", "warm_start = 'cobla' is not allowed"),
        ('extra_warm_starts = ["cobla"]', "", "cobla.extra_warm_starts"),
        ('joint_schedule = "linear"', "", "valid values: constant, cosine"),
        ("joint = 10\njoint_hard = 4\njoint_average = 5", "", "cobla.joint_average = 5 must be at most"),
        ("joint_average = -1", "", "cobla.joint_average"),
        ('extra_warm_starts = ["lc", "lc"]', "", "cobla.extra_warm_starts"),
        ('extra_warm_starts = ["pos_exact"]', "", "extra_warm_starts repeats cobla.warm_start = 'pos_exact'"),
        ('select = "f1"', "", "valid values: accuracy, loss"),
        ('mask_values = "half"', "", "valid values: relaxed, ones, plain"),
        ("local_search = -1", "", "cobla.local_search"),
        ("continuation = [-1.0]", "", "cobla.continuation"),
        ("", 'spectrum = "activations"', "valid values: weight, whitened"),
    ],
)
def test_bad_values_name_the_key(tmp_path, cobla, decompose, message):
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, cobla, decompose)
