"""llama.cpp control-vector export: tensor names / layer numbering, metadata keys, α baked in, multi-direction
and non-add vectors refused with a fix, round trip through gguf.GGUFReader, and the CLI."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from steer import SteeringVector
from steer.cli import app
from steer.errors import ConfigError, LayerError

gguf = pytest.importorskip("gguf")
from steer.vectors.export import export_gguf, gguf_directions, read_gguf  # noqa: E402

D = 16


def _vec(**meta):
    g = torch.Generator().manual_seed(0)
    base = {
        "model": {"model_type": "llama", "num_layers": 6, "hidden_size": D},
        "recommended": {"layers": [3], "alpha": 2.5, "mode": "add", "source_layer": 3},
    }
    base.update(meta)
    return SteeringVector({l: torch.randn(D, generator=g) for l in range(6)}, base)


def test_round_trip_recommended_layer_and_alpha(tmp_path):
    v = _vec()
    path = export_gguf(v, tmp_path / "v.gguf")
    reader = gguf.GGUFReader(str(path))
    assert [t.name for t in reader.tensors] == ["direction.3"]
    t = reader.tensors[0]
    assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [D]
    meta, tensors = read_gguf(path)
    assert meta["general.architecture"] == "controlvector"
    assert meta["controlvector.model_hint"] == "llama" and meta["controlvector.layer_count"] == 1
    assert json.loads(meta["steer.meta"])["recommended"]["alpha"] == 2.5
    assert np.array_equal(tensors[3], (2.5 * v.directions[3].double()).float().numpy())


def test_layer_numbering_all_layers_and_layer_zero(tmp_path):
    v = _vec()
    # direction.N is block N's output in llama.cpp as in steer: indices carry over unchanged
    out = gguf_directions(v, layers=[1, 2, 5], alpha=1.0)
    assert list(out) == [1, 2, 5] and all(np.array_equal(out[l], v.directions[l].numpy()) for l in out)
    with pytest.raises(LayerError, match="direction.0"):
        gguf_directions(v, layers=[0])
    # an input-site vector: the input of block i is the output of block i-1
    vin = _vec(site="input")
    assert list(gguf_directions(vin, layers=[2, 4])) == [1, 3]
    with pytest.raises(LayerError):
        gguf_directions(vin, layers=[1])
    meta, tensors = read_gguf(export_gguf(v, tmp_path / "all.gguf", layers=[1, 2, 3, 4, 5], alpha=-1.0))
    assert meta["controlvector.layer_count"] == 5 and sorted(tensors) == [1, 2, 3, 4, 5]
    assert np.array_equal(tensors[4], -v.directions[4].numpy())


def test_multi_direction_layers_need_an_index():
    g = torch.Generator().manual_seed(1)
    v = SteeringVector({2: torch.randn(3, D, generator=g)}, {"recommended": {"layers": [2], "alpha": 1.0}})
    with pytest.raises(ConfigError, match="direction-index"):
        gguf_directions(v)
    out = gguf_directions(v, direction_index=1)
    assert np.array_equal(out[2], v.directions[2][1].numpy())


def test_non_add_vectors_need_as_add():
    v = _vec(recommended={"layers": [3], "alpha": 1.0, "mode": "ablate"})
    with pytest.raises(ConfigError, match="only add"):
        gguf_directions(v)
    assert list(gguf_directions(v, allow_non_add=True)) == [3]


def test_cli_export_gguf(tmp_path):
    src = _vec().save(tmp_path / "v.safetensors")
    runner = CliRunner()
    res = runner.invoke(
        app, ["export", "gguf", str(src), "-o", str(tmp_path / "v.gguf"), "--layers", "2,4", "--alpha", "0.5"]
    )
    assert res.exit_code == 0, res.output
    meta, tensors = read_gguf(tmp_path / "v.gguf")
    assert sorted(tensors) == [2, 4] and meta["controlvector.layer_count"] == 2
    assert np.array_equal(tensors[2], (0.5 * SteeringVector.load(src).directions[2].double()).float().numpy())
    res = runner.invoke(app, ["export", "gguf", str(src), "-o", str(tmp_path / "z.gguf"), "--layers", "0"])
    assert res.exit_code == 2 and "direction.0" in res.output


def test_missing_gguf_names_the_install(monkeypatch):
    import sys

    import steer.vectors.export as ex
    from steer.errors import SteerError

    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(SteerError, match="pip install gguf"):
        ex._gguf()
