"""Issue 22, findings 1, 2 and the export defects: every file is checked before it is inflated.

A tiny two-layer MLP is exported by hand (no training): ``fc1`` factored at rank 3,
``head`` plain. Each damaged or crafted file must raise a ``CoblaxError`` naming the
file and the field; a deflate bomb must be refused before it is inflated (peak RSS
measured in a subprocess).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
import zipfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from coblax.lowrank.export import ExportError, load_factored, save_factored
from coblax.util.errors import CoblaxError
from coblax.util.limits import parse_json

REPO = Path(__file__).resolve().parents[1]


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16, name="fc1")(x))
        steps = self.variable("counter", "steps", lambda: jnp.zeros((), jnp.int32))
        del steps
        return nn.Dense(10, name="head")(x)


def make_result(dtype=np.float32, counter=None):
    counter = np.int32(0) if counter is None else counter
    rng = np.random.default_rng(0)
    params = {"fc1": {"bias": rng.normal(size=16).astype(dtype)},
              "head": {"kernel": rng.normal(size=(16, 10)).astype(dtype), "bias": np.zeros(10, dtype)}}
    factors = {"fc1": {"first": rng.normal(size=(8, 3)).astype(dtype),
                       "second": rng.normal(size=(3, 16)).astype(dtype)}}
    variables = {"params": params, "factors": factors, "counter": {"steps": np.asarray(counter)}}
    return types.SimpleNamespace(variables=variables, apply_kwargs={},
                                 factors={"fc1": types.SimpleNamespace(kind="dense", scheme="dense")})


def _saved(tmp_path, **kw) -> Path:
    path = tmp_path / "net.npz"
    save_factored(path, make_result(**kw), meta={"accuracy": 0.5})
    return path


def _rewrite(path: Path, arrays: dict | None = None, header=None) -> None:
    """Rewrite an export with some arrays and/or the header replaced."""
    with np.load(path) as data:
        content = {k: data[k] for k in data.files}
    content.update(arrays or {})
    if header is not None:
        text = header if isinstance(header, str) else json.dumps(header)
        content["__coblax__"] = np.frombuffer(text.encode(), np.uint8)
    np.savez(path, **content)


def _header(path: Path) -> dict:
    with np.load(path) as data:
        return json.loads(bytes(data["__coblax__"]))


def test_round_trip_and_shapes_checked_against_the_model(tmp_path):
    path = _saved(tmp_path)
    net = load_factored(path, Mlp(), example=jnp.zeros((1, 8)))
    x = np.random.default_rng(1).normal(size=(4, 8)).astype(np.float32)
    p = make_result().variables
    want = np.maximum(x @ p["factors"]["fc1"]["first"] @ p["factors"]["fc1"]["second"] + p["params"]["fc1"]["bias"], 0)
    want = want @ p["params"]["head"]["kernel"]
    np.testing.assert_allclose(np.asarray(net.apply(net.variables, jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


def test_bfloat16_leaves_round_trip_exactly(tmp_path):
    """Defect: bfloat16 leaves were stored as raw |V2 and loaded into a TypeError."""
    path = _saved(tmp_path, dtype=ml_dtypes.bfloat16)
    net = load_factored(path, Mlp())
    want = make_result(dtype=ml_dtypes.bfloat16).variables
    got = np.asarray(net.variables["params"]["head"]["kernel"])
    assert got.dtype == ml_dtypes.bfloat16
    assert np.array_equal(got.view(np.uint16), want["params"]["head"]["kernel"].view(np.uint16))
    assert np.asarray(net.variables["params"]["fc1"]["first"]["kernel"]).dtype == ml_dtypes.bfloat16


def test_cbx_int64_leaf_is_kept_exactly_with_x64_off(tmp_path):
    """Defect: load_factored_cbx turned an int64 leaf into int32 when x64 is off."""
    from coblax.app.export_cbx import load_factored_cbx, save_factored_cbx

    assert not jax.config.jax_enable_x64
    save_factored_cbx(tmp_path / "net.cbx", make_result(counter=np.int64(2**40 + 3)))
    net = load_factored_cbx(tmp_path / "net.cbx", Mlp())
    steps = net.variables["counter"]["steps"]
    assert steps.dtype == np.int64 and int(steps) == 2**40 + 3


def make_bomb(path: Path, n_elements: int) -> None:
    """An export whose ``head/bias`` deflates from ~0.1 % of its size into n_elements float32 zeros."""
    src = make_result()
    save_factored(path, src)
    with np.load(path) as data:
        content = {k: data[k] for k in data.files if k != "params/head/bias"}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for k, v in content.items():
            with zf.open(k + ".npy", "w") as fh:
                np.lib.format.write_array(fh, v)
        with zf.open("params/head/bias.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False,
                                                      "shape": (n_elements,)})
            chunk = bytes(1 << 24)
            for _ in range(n_elements * 4 // len(chunk)):
                fh.write(chunk)


def test_zip_bomb_refused_before_inflating(tmp_path):
    """Finding 1: a ~0.5 MB .npz inflated a 2^27-element bias (512 MB) into Dense(10)."""
    path = tmp_path / "bomb.npz"
    make_bomb(path, 1 << 27)
    assert path.stat().st_size < 1 << 20
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from test_safe_load import Mlp
        from coblax.lowrank.export import load_factored
        from coblax.util.errors import CoblaxError
        def hwm():  # not getrusage: Linux carries pytest's peak into the child
            with open("/proc/self/status") as fh:
                return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:"))
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # the peak restarts from the current RSS
        before = hwm()
        try:
            load_factored({str(path)!r}, Mlp())
            outcome = "loaded"
        except CoblaxError as err:
            outcome = "refused: " + str(err)
        grew = (hwm() - before) / 1024
        print(f"{{grew:.1f}}", outcome)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    grew, outcome = out.stdout.split(" ", 1)
    assert outcome.startswith("refused") and "bomb.npz" in outcome and "declare" in outcome, outcome
    assert float(grew) < 200.0, out.stdout


def _truncate(p): p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
def _empty(p): p.write_bytes(b"")
def _no_layers(p): _rewrite(p, header={k: v for k, v in _header(p).items() if k != "layers"})
def _list_header(p): _rewrite(p, header="[1, 2]")
def _deep_header(p): _rewrite(p, header="[" * 5000 + "]" * 5000)
def _unknown_layer(p): _rewrite(p, header=_header(p) | {"layers": {"fc9": {"kind": "dense", "scheme": "dense"}}})
def _nan_constant(p): _rewrite(p, header=json.dumps(_header(p)).replace('0.5', 'NaN'))
def _object_array(p):
    with zipfile.ZipFile(p, "a") as zf, zf.open("params/evil.npy", "w") as fh:
        np.lib.format.write_array(fh, np.array([{"a": 1}], dtype=object), allow_pickle=True)
def _wrong_rank(p): _rewrite(p, arrays={"params/fc1/second/kernel": np.zeros((4, 16), np.float32)})


def _bitflip(p):
    data = bytearray(p.read_bytes())
    data[len(data) // 3] ^= 0x10
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,field", [
    (_truncate, "net.npz"),
    (_empty, "net.npz"),
    (_bitflip, "net.npz"),
    (_no_layers, "header field 'layers' is missing"),
    (_list_header, "header is a JSON list"),
    (_deep_header, "nested 5000 levels deep"),
    (_unknown_layer, "array 'params/fc9/first/kernel' is missing"),
    (_nan_constant, "NaN is not a finite number"),
    (_object_array, "member 'params/evil.npy'"),
    (_wrong_rank, "params/fc1/first|second/kernel"),
])
def test_damaged_files_raise_one_named_error(tmp_path, damage, field):
    """Finding 2: BadZipFile, EOFError, KeyError, AttributeError, RecursionError, apply-time failures."""
    path = _saved(tmp_path)
    damage(path)
    with pytest.raises(CoblaxError) as info:
        load_factored(path, Mlp())
    assert str(path) in str(info.value) and field in str(info.value)


def test_shapes_checked_against_the_model_before_loading(tmp_path):
    path = _saved(tmp_path)
    _rewrite(path, arrays={"params/head/bias": np.zeros(11, np.float32)})
    load_factored(path, Mlp())  # consistent with its own header...
    with pytest.raises(ExportError, match=r"'params/head/bias' has shape \(11,\), the model's is \(10,\)"):
        load_factored(path, Mlp(), example=jnp.zeros((1, 8)))  # ...but not with the model
    with pytest.raises(ExportError, match="fc1.*outer dimensions"):
        load_factored(_saved(tmp_path), Mlp(), example=jnp.zeros((1, 9)))


def test_cbx_given_to_load_factored_is_named(tmp_path):
    from coblax.app.export_cbx import save_factored_cbx

    save_factored_cbx(tmp_path / "net.cbx", make_result())
    with pytest.raises(ExportError, match="net.cbx: a .cbx file; read it with"):
        load_factored(tmp_path / "net.cbx", Mlp())
    renamed = tmp_path / "net2.npz"
    renamed.write_bytes((tmp_path / "net.cbx").read_bytes())
    with pytest.raises(CoblaxError, match="net2.npz: not an .npz file") as info:
        load_factored(renamed, Mlp())
    assert "allow_pickle" not in str(info.value)


@pytest.mark.parametrize("text,message", [
    ("1e999", "1e999 is out of range"),
    ("10" + "0" * 400, "more than 19 digits"),
    ('{"a": Infinity}', "Infinity is not a finite number"),
    ("[" * 65 + "]" * 65, "nested 65 levels deep"),
])
def test_json_limits(text, message):
    with pytest.raises(CoblaxError, match=message):
        parse_json(text, "f.json")
    assert parse_json('{"s": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}', "f") != {}
