"""The README's API section runs as written: its code block is executed unchanged, with a
small BatchNorm/dropout ``MyNet`` and the bundled digits supplying the names it leaves free."""

from __future__ import annotations

import re
from pathlib import Path

import flax.linen as nn
import numpy as np

from coblax.nn.data import load_dataset

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_api_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Your own model (Python API)"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


class MyNet(nn.Module):
    """conv1 (kept), conv2 (tai), fc1 and head (dense), as the block's rules expect."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(8, (3, 3), padding="SAME", name="conv1")(x))
        x = nn.Conv(12, (3, 3), strides=2, padding="SAME", name="conv2")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn2")(x))
        x = nn.relu(nn.Dense(32, name="fc1")(x.reshape(x.shape[0], -1)))
        x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="head")(x)


def test_readme_api_block_runs_as_written(tmp_path, monkeypatch):
    block = readme_api_block()
    assert "method=coblax.allocators.cobla(" in block and "allocate(" in block
    data = load_dataset("digits", seed=0)
    names = {"MyNet": MyNet, "x_train": data.x_train, "y_train": data.y_train,
             "x_test": data.x_test, "y_test": data.y_test}
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(README), "exec"), names)  # noqa: S102 - the README's own code
    result, net = names["result"], names["net"]
    # What the block's comments promise: budgets met, the .npz's size, the files written.
    assert result.mac_ratio <= 0.4 + 1e-9 and result.param_ratio <= 0.4 + 1e-9
    assert names["saved"].total_bytes == (tmp_path / "net.npz").stat().st_size
    assert (tmp_path / "net.cbx").is_file()
    logits = net.apply(net.variables, data.x_test[:4])
    assert logits.shape == (4, 10) and np.all(np.isfinite(np.asarray(logits)))
