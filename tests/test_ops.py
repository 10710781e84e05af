"""The op extension point (steer.ops): every registered op's fused plan against its plain-PyTorch reference, the
per-row contract (α = 0 leaves a row bit-exactly unchanged), the two ops from the field (ACE, angular) against
their formulas, steered hidden states in a model against the reference applied to the unsteered ones, and a
user-registered op working through the whole runtime."""

import math

import pytest
import torch
from capture import assert_unhooked
from tiny_models import D, tiny_model, tiny_tokenizer

import steer.kernels as K
from steer import Condition, SteeredModel, SteeringVector
from steer.errors import ConfigError, VectorFileError
from steer.kernels.angular import reference_rotate_, rotate_
from steer.ops import OPS, Op, get_op, register_op

LAYER = 1


def _operands(op, d=D, k=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(k, d, generator=g)
    extras = {name: torch.randn(d, generator=g) for name in op.needs}
    return op.prepare(dirs, extras)


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("shape", [(3, 1, 8), (3, 5, 33), (2, 7, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_plan_matches_reference(name, shape, dtype, masked):
    op = OPS[name]
    B, T, d = shape
    vecs, j = _operands(op, d)
    g = torch.Generator().manual_seed(1)
    h = (torch.randn(B, T, d, generator=g) * 3).to(dtype)
    alphas = torch.tensor([1.5, 0.0, -0.7][:B])
    coef = op.coefficients(alphas, j, vecs.shape[0])
    mask = (torch.rand(B, T, generator=g) > 0.4) if masked else None
    want = op.reference(h.clone(), vecs, coef, j, mask)
    for impl in ("cpu", "reference"):
        with K.using(impl):
            plan = op.plan(vecs, j).update(coef)
            got = plan.steer_(h.clone(), mask, T == 1, True)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=3e-2)
        torch.testing.assert_close(got, want, **tol)
        assert torch.equal(got[1], h[1])  # α = 0: the row is unchanged, bit for bit
        if mask is not None:
            assert torch.equal(got[~mask], h[~mask])  # masked tokens too


@pytest.mark.parametrize("name", sorted(OPS))
def test_plan_is_differentiable(name):
    op = OPS[name]
    vecs, j = _operands(op)
    coef = op.coefficients(torch.tensor([0.8, 0.3]), j, vecs.shape[0])
    leaf = torch.randn(2, 3, D, requires_grad=True)
    out = op.plan(vecs, j).update(coef).steer_(leaf * 1, None, False, True)
    out.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    torch.testing.assert_close(out.detach(), op.reference(leaf.detach().clone(), vecs, coef, j), rtol=1e-5, atol=1e-5)


def test_ace_formula():
    """h − ((h − μ)·r̂)r̂ + α·v, by the formula of Marshall et al. 2024, for one and two directions."""
    op = get_op("ace")
    g = torch.Generator().manual_seed(2)
    for k in (1, 2):
        d = torch.randn(k, D, generator=g)
        mu = torch.randn(D, generator=g)
        vecs, j = op.prepare(d, {"mean": mu})
        h = torch.randn(2, 4, D, generator=g)
        coef = op.coefficients(torch.tensor([1.0, 2.5]), j, vecs.shape[0])
        got = op.reference(h.clone(), vecs, coef, j)
        q = torch.linalg.qr(d.T).Q  # [D, k] orthonormal basis of the directions
        for b, a in enumerate((1.0, 2.5)):
            want = h[b] - ((h[b] - mu) @ q) @ q.T + a * d.sum(0)
            torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-5)
    # α = 1 on one direction: the component along r̂ is the harmful mean's, μ·r̂ + |v|, wherever h started
    d, mu = torch.randn(1, D, generator=g), torch.randn(D, generator=g)
    vecs, j = op.prepare(d, {"mean": mu})
    h = torch.randn(3, 2, D, generator=g) * 5
    out = op.reference(h.clone(), vecs, op.coefficients(torch.ones(3), j, vecs.shape[0]), j)
    r = d[0] / d[0].norm()
    torch.testing.assert_close(out @ r, torch.full((3, 2), float(mu @ r + d[0].norm())), rtol=1e-5, atol=1e-4)


def test_angular_rotation():
    """Norm kept; the angle to r̂ falls by α·90° (stopping at r̂); an orthogonal token lands on ‖h‖r̂ at α = 1;
    negative α turns away; a token parallel to r̂ has no plane and stays."""
    g = torch.Generator().manual_seed(3)
    r = torch.randn(D, generator=g)
    r = r / r.norm()
    h = torch.randn(4, 6, D, generator=g)
    for a in (0.3, -0.4, 1.0):
        theta = torch.full((4,), a * math.pi / 2)
        out = reference_rotate_(h.clone(), r, theta)
        torch.testing.assert_close(out.norm(dim=-1), h.norm(dim=-1), rtol=1e-5, atol=1e-5)
        before = torch.acos((h @ r / h.norm(dim=-1)).clamp(-1, 1))
        after = torch.acos((out @ r / out.norm(dim=-1)).clamp(-1, 1))
        torch.testing.assert_close(after, (before - theta[:, None]).clamp(0, math.pi), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rotate_(h.clone(), r, theta), out, rtol=1e-5, atol=1e-5)
    ortho = torch.randn(D, generator=g)
    ortho = (ortho - (ortho @ r) * r)[None, None]
    out = reference_rotate_(ortho.clone(), r, torch.tensor([math.pi / 2]))
    torch.testing.assert_close(out[0, 0], ortho.norm() * r, rtol=1e-5, atol=1e-5)
    par = (2 * r)[None, None]
    assert torch.equal(reference_rotate_(par.clone(), r, torch.tensor([1.0])), par)
    assert torch.equal(rotate_(par.clone(), r, torch.tensor([1.0])), par)


def _capture(sm, layer, ids):
    out = {}

    def grab(module, args, output):
        out["h"] = (output if isinstance(output, torch.Tensor) else output[0]).detach().clone()

    handle = sm.layers[layer].register_forward_hook(grab)
    try:
        sm.model(ids)
    finally:
        handle.remove()
    return out["h"]


@pytest.mark.parametrize("name", ["ace", "angular"])
def test_steered_hidden_state_equals_reference(name, exact_and_one_thread):
    """In a model: the steered block output == op.reference(unsteered block output) with each row's α, the
    α = 0 row bit-exact, and hooks gone afterwards."""
    model = tiny_model("llama")
    sm = SteeredModel(model, tiny_tokenizer())
    g = torch.Generator().manual_seed(4)
    vec = SteeringVector({LAYER: torch.randn(D, generator=g) * 2}, {}, None, {f"mean.{LAYER}": torch.randn(D)})
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])
    base = _capture(sm, LAYER, ids)
    alphas = [0.8, 0.0, -1.3]
    with sm.steer(vec, mode=name, layers=[LAYER]) as handle:
        handle.set_alphas(alphas)
        steered = _capture(sm, LAYER, ids)
    op = get_op(name)
    vecs, j = op.prepare(vec.directions[LAYER][None].float(), {"mean": vec.extra[f"mean.{LAYER}"]})
    want = op.reference(base.clone(), vecs, op.coefficients(torch.tensor(alphas), j, vecs.shape[0]), j)
    torch.testing.assert_close(steered, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(steered[1], base[1])
    assert_unhooked(sm.model, sm.layers)


def test_op_errors_before_attaching(sm):
    vec = SteeringVector({LAYER: torch.randn(D)})
    with pytest.raises(VectorFileError, match="mean"):  # ACE needs the reference mean in the file
        sm.steer(vec, mode="ace", layers=[LAYER])
    two = SteeringVector({LAYER: torch.randn(2, D)})
    with pytest.raises(ConfigError, match="one direction"):
        sm.steer(two, mode="angular", layers=[LAYER])
    with pytest.raises(ConfigError, match="non-zero"):
        sm.steer(SteeringVector({LAYER: torch.zeros(D)}), mode="angular", layers=[LAYER])
    assert_unhooked(sm.model, sm.layers)
    with pytest.raises(ConfigError):
        register_op(get_op("add"))  # taken
    with pytest.raises(ConfigError):
        register_op(Op("conditional", prepare=lambda d, e: (d, 0), coefficients=lambda a, j, m: a[:, None]))


def test_user_op_through_the_runtime(sm, exact_and_one_thread):
    """A user op registered once is a mode everywhere: config, vector files, per-row α, generate."""
    op = Op(
        "double_add",  # h + 2α·v: the add kernel with its own coefficients
        prepare=lambda d, e: (d, 0),
        coefficients=lambda a, j, m: 2 * a.float()[:, None].expand(-1, m),
        nonzero=False,
    )
    register_op(op)
    try:
        v = torch.randn(D)
        vec = SteeringVector({LAYER: v}, {"op": "double_add"})
        ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
        base = _capture(sm, LAYER, ids)
        with sm.steer(vec, layers=[LAYER]) as handle:
            handle.set_alphas([1.0, 0.0])
            got = _capture(sm, LAYER, ids)
        torch.testing.assert_close(got[0], base[0] + 2 * v, rtol=0, atol=1e-6)
        assert torch.equal(got[1], base[1])
        out = sm.generate(["hi", "there"], vector=vec, alphas=[0.0, 0.0], layers=[LAYER], max_new_tokens=3)
        assert out == sm.generate(["hi", "there"], max_new_tokens=3)
    finally:
        OPS.pop("double_add")
    assert_unhooked(sm.model, sm.layers)


@pytest.mark.parametrize("impl", ["reference", "cpu"])
@pytest.mark.parametrize("name", sorted(OPS))
def test_gate_closed_rows_exact_open_rows_reference(name, impl):
    """Every op under the CAST gate, through the kernel a hook really uses: rows whose gate stays closed are
    bit-exact, open rows equal the op's reference on the unsteered output (fp32, 1e-5)."""
    torch.set_num_threads(1)
    model = tiny_model("llama")
    sm = SteeredModel(model, tiny_tokenizer())
    g = torch.Generator().manual_seed(6)
    vec = SteeringVector({2: torch.randn(D, generator=g) * 2}, {}, None, {"mean.2": torch.randn(D, generator=g)})
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16], [17, 18, 19, 20]])
    base = _capture(sm, 2, ids)
    gate_h = _capture(sm, 1, ids)[:, -1]
    cdir = torch.randn(D, generator=g)
    scores = gate_h @ (cdir / cdir.norm())
    cond = Condition(layer=1, direction=cdir, threshold=float(scores.median()))
    opened = scores > cond.threshold
    assert 0 < int(opened.sum()) < 4
    with K.using(impl), sm.steer(vec, mode=name, layers=[2], condition=cond) as handle:
        handle.set_alphas([0.7, 0.7, -0.4, 0.9])
        steered = _capture(sm, 2, ids)
    op = get_op(name)
    vecs, j = op.prepare(vec.directions[2][None].float(), {"mean": vec.extra["mean.2"]})
    want = op.reference(base.clone(), vecs, op.coefficients(torch.tensor([0.7, 0.7, -0.4, 0.9]), j, vecs.shape[0]), j)
    for row in range(4):
        if opened[row]:
            torch.testing.assert_close(steered[row], want[row], rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(steered[row], base[row])


def test_angular_near_the_direction():
    """Tokens within 1e-3 and 1e-4 rad of ±r̂: the fused path agrees with the reference and keeps the norm; at
    1e-6 rad (below fp32's resolution of the plane) the token counts as parallel and both leave it unchanged."""
    g = torch.Generator().manual_seed(7)
    r = torch.randn(D, generator=g, dtype=torch.float64)
    r = r / r.norm()
    u = torch.randn(D, generator=g, dtype=torch.float64)
    u = u - (u @ r) * r
    u = u / u.norm()
    toks = [s * (math.cos(e) * r + math.sin(e) * u) * 7 for e in (1e-3, 1e-4) for s in (1, -1)]
    h = torch.stack(toks).float()[None]  # [1, 4, D]
    tiny = torch.stack([s * (math.cos(1e-6) * r + math.sin(1e-6) * u) * 7 for s in (1, -1)]).float()[None]
    r32 = r.float()
    for a in (0.2, -0.2):
        theta = torch.tensor([a * math.pi / 2])
        exact = reference_rotate_(h.double(), r32.double(), theta.double())  # the same fp32 inputs, in fp64
        spec = reference_rotate_(h.clone(), r32, theta)
        got = rotate_(h.clone(), r32, theta)
        # the plane of a token this close to ±r̂ is ill-conditioned in fp32: the fused path must be as accurate
        # as the fp32 reference is (the old sqrt(|h|² - a²) form was off by percent here, or left the token)
        err_spec = (spec.double() - exact).norm(dim=-1)
        err_got = (got.double() - exact).norm(dim=-1)
        assert (err_got <= 4 * err_spec + 1e-4).all(), (err_got, err_spec)
        # |h| kept to what fp32 resolves here (the reference is off by 1.3e-5 too: r and û are orthogonal only
        # to within the rounding of u = h - a r, which is 1e-4 of |h| long)
        torch.testing.assert_close(got.norm(dim=-1), h.norm(dim=-1), rtol=5e-5, atol=0)
        for f in (reference_rotate_, rotate_):
            assert torch.equal(f(tiny.clone(), r32, theta), tiny)
