"""The vector file: round trip, metadata, arithmetic, and every kind of bad file."""

import json
import pickle

import pytest
import torch
from capture import assert_unhooked
from safetensors.torch import save_file
from tiny_models import D, tiny_model

from steer import SteeredModel, SteeringVector
from steer.errors import ModelMismatchError, VectorFileError


def _vec(**meta):
    torch.manual_seed(0)
    return SteeringVector({1: torch.randn(D), 2: torch.randn(D)}, meta)


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    sm = SteeredModel(tiny_model("llama"))
    vec = SteeringVector(
        {1: torch.randn(D), 2: torch.randn(2, D)},
        {
            "kind": "refusal",
            "op": "ablate",
            "model": sm.fingerprint(),
            "recommended": {"layers": [2], "alpha": 1.5, "mode": "add"},
            "condition": {"layer": 1, "threshold": 0.25, "reduce": "last", "comparator": ">"},
            "provenance": {"method": "diff_in_means", "prompt_sets": {"harmful": "ab12"}},
        },
        condition_direction=torch.randn(D),
        extra={"sae.W_dec": torch.randn(4, D)},
    )
    path = vec.save(tmp_path / "v.safetensors")
    back = SteeringVector.load(path)
    assert back.layers == [1, 2] and back.kind == "refusal" and back.recommended["alpha"] == 1.5
    for k in vec.directions:
        assert torch.equal(back.directions[k], vec.directions[k])
    assert torch.equal(back.condition_direction, vec.condition_direction)
    assert torch.equal(back.extra["sae.W_dec"], vec.extra["sae.W_dec"])
    assert back.meta["norms"]["1"] == pytest.approx(float(vec.directions[1].norm()), rel=1e-5)
    assert back.meta["model"]["hidden_size"] == D and back.meta["model"]["num_layers"] == 4
    assert back.meta["provenance"]["steer_version"] and back.meta["provenance"]["created"]
    back.check_model(sm.fingerprint())


def test_arithmetic():
    a, b = _vec(), SteeringVector({2: torch.ones(D), 3: torch.ones(D)})
    s = a + b
    assert s.layers == [1, 2, 3]
    assert torch.equal(s.directions[2], a.directions[2] + 1)
    assert torch.equal((a - b).directions[3], -torch.ones(D))
    assert torch.equal((2 * a).directions[1], a.directions[1] * 2)
    assert torch.equal((-a).directions[1], -a.directions[1])
    with pytest.raises(ModelMismatchError):
        a + SteeringVector({1: torch.ones(D + 1)})


def test_mismatches_are_clear_errors():
    sm = SteeredModel(tiny_model("llama"))
    fp = sm.fingerprint()
    with pytest.raises(ModelMismatchError, match="hidden size") as e:
        SteeringVector({1: torch.ones(D + 8)}).check_model(fp)
    assert "expected: hidden size 32" in str(e.value) and "fix:" in str(e.value)
    with pytest.raises(ModelMismatchError, match="layer count"):
        SteeringVector({1: torch.ones(D)}, {"model": {**fp, "num_layers": 12}}).check_model(fp)
    with pytest.raises(ModelMismatchError, match="another architecture"):
        SteeringVector({1: torch.ones(D)}, {"model": {**fp, "model_type": "gpt2"}}).check_model(fp)
    SteeringVector({1: torch.ones(D)}, {"model": {**fp, "model_type": "gpt2"}}).check_model(
        fp, check_architecture=False
    )
    with pytest.raises(ModelMismatchError, match="layers"):
        SteeringVector({9: torch.ones(D)}).check_model(fp)
    with pytest.raises(ModelMismatchError):  # refused before any hook is attached
        sm.steer(SteeringVector({1: torch.ones(D + 8)}))
    assert_unhooked(sm.model, sm.layers)


def test_non_finite_direction_rejected():
    with pytest.raises(VectorFileError, match="NaN"):
        SteeringVector({1: torch.tensor([1.0, float("nan")])})


def test_pickle_renamed_is_refused_without_unpickling(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('pwned')" % str(tmp_path / "pwned"),))

    p = tmp_path / "evil.safetensors"
    p.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(VectorFileError, match="pickle"):
        SteeringVector.load(p)
    t = tmp_path / "torch.safetensors"
    torch.save({"direction.1": torch.ones(D)}, t)
    with pytest.raises(VectorFileError, match="pickle"):
        SteeringVector.load(t)
    assert not (tmp_path / "pwned").exists()


def test_header_length_that_starts_like_a_pickle_still_loads(tmp_path):
    """A safetensors header length whose first byte is 0x80 (1 length in 256) is not a pickle (was misread)."""
    for pad in range(600):
        v = SteeringVector({1: torch.ones(D)}, {"provenance": {"note": "x" * pad}})
        path = v.save(tmp_path / "v.safetensors")
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no padding gave a header length starting with 0x80")
    assert torch.equal(SteeringVector.load(path).directions[1], torch.ones(D))


def test_garbage_missing_and_foreign_files(tmp_path):
    g = tmp_path / "g.safetensors"
    g.write_bytes(b"hello world, not tensors at all")
    with pytest.raises(VectorFileError, match="not a"):
        SteeringVector.load(g)
    with pytest.raises(VectorFileError, match="not found"):
        SteeringVector.load(tmp_path / "missing.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"direction.1": torch.ones(D)}, str(plain))
    with pytest.raises(VectorFileError, match="no steer metadata"):
        SteeringVector.load(plain)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"direction.1": torch.ones(D)}, str(foreign), metadata={"steer": json.dumps({"format": "x"})})
    with pytest.raises(VectorFileError, match="foreign"):
        SteeringVector.load(foreign)
    future = tmp_path / "future.safetensors"
    save_file(
        {"direction.1": torch.ones(D)},
        str(future),
        metadata={"steer": json.dumps({"format": "steer.vector", "format_version": 99})},
    )
    with pytest.raises(VectorFileError, match="version"):
        SteeringVector.load(future)
    odd = tmp_path / "odd.safetensors"
    save_file(
        {"weights": torch.ones(D)},
        str(odd),
        metadata={"steer": json.dumps({"format": "steer.vector", "format_version": 1})},
    )
    with pytest.raises(VectorFileError, match="unknown tensor"):
        SteeringVector.load(odd)


@pytest.mark.parametrize(
    "meta",
    [
        {"scope": "bogus"},
        {"site": "middle"},
        {"op": "rm -rf"},
        {"kind": "x"},
        {"recommended": {"mode": "bogus"}},
        {"recommended": {"alpha": float("nan")}},
        {"recommended": {"layers": "2"}},
        {"condition": {"layer": 1}},
    ],
)
def test_invalid_metadata_values_rejected(meta, tmp_path):
    with pytest.raises(VectorFileError, match="metadata"):
        SteeringVector({1: torch.ones(D)}, meta)
    ok = SteeringVector({1: torch.ones(D)}).save(tmp_path / "ok.safetensors")  # the same values from a file
    from safetensors.torch import load_file, save_file

    raw = json.loads(__import__("safetensors").safe_open(str(ok), "pt").metadata()["steer"])
    raw.update(meta)
    save_file(load_file(str(ok)), str(tmp_path / "bad.safetensors"), metadata={"steer": json.dumps(raw)})
    with pytest.raises(VectorFileError, match="metadata"):
        SteeringVector.load(tmp_path / "bad.safetensors")


def test_file_op_is_the_default_mode_and_zero_directions_cannot_be_ablated():
    sm = SteeredModel(tiny_model("llama"))
    with sm.steer(SteeringVector({1: torch.ones(D)}, {"op": "ablate"})) as h:
        assert h.op == "ablate"
    with pytest.raises(Exception, match="zero direction"):
        sm.steer(SteeringVector({1: torch.zeros(D)}), mode="ablate")
    assert_unhooked(sm.model, sm.layers)
