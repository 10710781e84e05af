"""SAE features that separate harmful from harmless prompts, stored as a steer vector (kind ``"sae"``).

Sparse autoencoders (Bricken et al. 2023; Cunningham et al. 2023) decompose the residual stream into sparse
features; a few of them track "this request is harmful" (O'Brien et al. 2024, "Steering Language Model
Refusal with Sparse Autoencoders"). This module

1. loads an SAE saved by sae-lens (``SAE.load_from_disk``) or trains a small TopK SAE (Gao et al. 2024) on
   the model's own activations at one layer (every token of the given prompts, plus optional extra text);
2. scores every feature per prompt (max / mean over the prompt's tokens, or the last token) and ranks
   features by how well that score separates harmful from harmless prompts (ROC AUC, mean difference);
3. writes the top features' decoder rows as ``direction.{L}`` ``[k, d]`` (so steer's ``add`` op adds
   α·W_dec[f]: α is in units of feature activation) with ids and statistics in ``meta["sae"]``, plus the
   whole SAE as extra tensors so :mod:`steer.sae_clamp` can clamp any feature without sae-lens.

sae-lens is optional (extra ``sae``) and imported lazily: only ``--sae DIR`` and ``--train`` need it.
Hook names map to steer's layers: ``blocks.N.hook_resid_post`` → layer N output, ``blocks.N.hook_resid_pre``
→ layer N input.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import warnings

import torch

from steer.errors import ConfigError
from steer.sae_clamp import SAEWeights
from steer.vector import SteeringVector

REDUCES = ("max", "mean", "last")


def _sae_lens():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import sae_lens
    except ImportError:
        raise ConfigError(
            "sae-lens is not installed",
            expected="the optional extra 'sae'",
            found="no sae_lens",
            fix="pip install 'steer-runtime[sae]' (or pip install sae-lens)",
        ) from None
    return sae_lens


@contextlib.contextmanager
def _threads(n: int):
    """Tiny SAEs train ~10x faster on one thread (no intra-op sync on small matmuls)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------------------------------ SAEs
def hook_to_layer(hook_name: str) -> tuple[int, str]:
    """``blocks.N.hook_resid_post`` → (N, "output"); ``blocks.N.hook_resid_pre`` → (N, "input")."""
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", hook_name or "")
    if not m:
        raise ConfigError(
            "unsupported SAE hook",
            expected="blocks.N.hook_resid_post or blocks.N.hook_resid_pre",
            found=repr(hook_name),
            fix="use a residual-stream SAE (or pass --layer explicitly)",
        )
    return int(m.group(1)), "output" if m.group(2) == "post" else "input"


@torch.no_grad()
def weights_from_sae_lens(sae) -> SAEWeights:
    """Plain float32 weights of a sae-lens SAE (standard / topk / jumprelu), decoder-norm rescaling folded."""
    cfg = sae.cfg
    arch = cfg.architecture()
    if getattr(cfg, "normalize_activations", "none") != "none" or getattr(cfg, "reshape_activations", "none") != "none":
        raise ConfigError(
            "unsupported SAE input normalisation",
            expected="normalize_activations='none'",
            found=f"{cfg.normalize_activations!r} / {cfg.reshape_activations!r}",
            fix="fold the normalisation into the weights before saving the SAE",
        )
    if arch not in ("standard", "topk", "jumprelu"):
        raise ConfigError(
            "unsupported SAE architecture",
            expected="standard, topk or jumprelu",
            found=repr(arch),
            fix="use one of those sae-lens architectures",
        )
    W_enc, b_enc = sae.W_enc.detach().float().clone(), sae.b_enc.detach().float().clone()
    W_dec, b_dec = sae.W_dec.detach().float().clone(), sae.b_dec.detach().float().clone()
    if arch == "topk" and getattr(cfg, "rescale_acts_by_decoder_norm", False):
        n = W_dec.norm(dim=-1).clamp_min(1e-8)
        W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
    threshold = sae.threshold.detach().float().clone() if arch == "jumprelu" else None
    return SAEWeights(
        W_enc,
        b_enc,
        W_dec,
        b_dec,
        {"standard": "relu"}.get(arch, arch),
        int(cfg.k) if arch == "topk" else None,
        threshold,
        bool(cfg.apply_b_dec_to_input),
    )


def load_sae(path) -> tuple[SAEWeights, str | None]:
    """An SAE saved by sae-lens (``save_model`` / ``load_from_disk``) → (weights, hook name or None)."""
    sl = _sae_lens()
    try:
        sae = sl.SAE.load_from_disk(str(path), device="cpu")
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"cannot load the SAE at {path}",
            expected="a folder written by sae-lens save_model",
            found=str(exc).splitlines()[0][:200],
            fix="check --sae DIR",
        ) from None
    return weights_from_sae_lens(sae), getattr(sae.cfg.metadata, "hook_name", None)


def train_sae(
    acts: torch.Tensor,
    *,
    d_sae: int | None = None,
    k: int = 8,
    steps: int = 1500,
    batch_size: int = 256,
    lr: float = 3e-3,
    seed: int = 0,
    threads: int = 1,
    hook_name: str | None = None,
):
    """Train a TopK SAE (sae-lens ``TopKTrainingSAE`` + ``SAETrainer``, no logging) on ``acts`` [N, d].

    Returns ``(sae_lens_sae, SAEWeights)``.
    """
    sl = _sae_lens()
    os.environ.setdefault("WANDB_MODE", "disabled")
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    acts = acts.detach().float().cpu()
    n, d = acts.shape
    d_sae = d_sae or 4 * d
    if n < 2 or not 0 < k <= d_sae:
        raise ConfigError(
            "cannot train an SAE on this data",
            expected=f"≥ 2 activations and 1 ≤ k ≤ {d_sae}",
            found=f"{n} activations, k={k}",
            fix="give more prompts / extra text, or a smaller k",
        )
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=hook_name) if hook_name else SAEMetadata()
    torch.manual_seed(seed)
    sae = sl.TopKTrainingSAE(sl.TopKTrainingSAEConfig(d_in=d, d_sae=d_sae, k=k, metadata=meta))
    with torch.no_grad():  # start the decoder bias at the data mean (geometric-median init, Bricken et al.)
        sae.b_dec.copy_(acts.mean(0))
    gen = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            yield acts[torch.randint(0, n, (batch_size,), generator=gen)]

    cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr / 10,
        lr_scheduler_name="cosineannealing",
        dead_feature_window=max(50, steps // 4),
        feature_sampling_window=max(100, steps // 2),
    )
    with _threads(threads), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = SAETrainer(cfg=cfg, sae=sae, data_provider=batches()).fit()
    return sae, weights_from_sae_lens(sae)


@torch.no_grad()
def sae_stats(sae: SAEWeights, acts: torch.Tensor) -> dict:
    """FVU (fraction of variance unexplained), mean L0, and features that never fire on ``acts``."""
    a = sae.encode(acts)
    rec = sae.decode(a)
    x = acts.float()
    fvu = float((rec - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12))
    fired = (a > 0).any(0)
    return {
        "fvu": round(fvu, 6),
        "l0": round(float((a > 0).sum(-1).float().mean()), 4),
        "dead": int((~fired).sum()),
        "d_sae": sae.d_sae,
        "tokens": int(x.shape[0]),
    }


# ------------------------------------------------------------------------------------------ activations
@torch.no_grad()
def token_activations(
    sm, texts: list[str], layer: int, *, site: str = "output", chat: bool = True, batch_size: int = 32
) -> list[torch.Tensor]:
    """Per-prompt activations at every real (non-padding) token: a list of float32 ``[T_i, d]``."""
    from steer.layers import check_layers

    layer = check_layers([layer], sm.num_layers)[0]
    formatted = sm.format(list(texts), chat=chat)
    chat_applied = chat and bool(getattr(sm.tokenizer, "chat_template", None))
    box = {}

    def out_hook(mod, args, out):
        box["h"] = (out if isinstance(out, torch.Tensor) else out[0]).detach().float().cpu()

    def in_hook(mod, args, kwargs):
        box["h"] = (args[0] if args else kwargs["hidden_states"]).detach().float().cpu()

    block = sm.layers[layer]
    handle = (
        block.register_forward_hook(out_hook)
        if site == "output"
        else block.register_forward_pre_hook(in_hook, with_kwargs=True)
    )
    out = []
    try:
        for s in range(0, len(formatted), batch_size):
            enc = sm.encode(formatted[s : s + batch_size], chat_applied, position_ids=True)
            sm.model(**enc, use_cache=False)
            mask = enc["attention_mask"].bool().cpu()
            out.extend(box["h"][i][mask[i]] for i in range(mask.shape[0]))
    finally:
        handle.remove()
    return out


def prompt_scores(sae: SAEWeights, per_prompt: list[torch.Tensor], reduce: str = "max") -> torch.Tensor:
    """Feature score per prompt ``[N, m]``: max / mean over the prompt's tokens, or its last token."""
    if reduce not in REDUCES:
        raise ConfigError("unknown reduce", expected=" | ".join(REDUCES), found=repr(reduce), fix="use 'max'")
    rows = []
    for h in per_prompt:
        a = sae.encode(h)
        rows.append(a.max(0).values if reduce == "max" else a.mean(0) if reduce == "mean" else a[-1])
    return torch.stack(rows)


def auc(pos: torch.Tensor, neg: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """ROC AUC per column: P(pos > neg) + ½ P(pos = neg) (Mann–Whitney U / (P·Q)), ties handled exactly."""
    out = []
    for s in range(0, pos.shape[1], chunk):
        p, q = pos[:, None, s : s + chunk], neg[None, :, s : s + chunk]
        out.append(((p > q).float().sum((0, 1)) + 0.5 * (p == q).float().sum((0, 1))) / (pos.shape[0] * neg.shape[0]))
    return torch.cat(out)


def rank_features(
    sae: SAEWeights, harmful: list[torch.Tensor], harmless: list[torch.Tensor], *, reduce: str = "max", top: int = 8
) -> list[dict]:
    """Top features by separation |AUC − ½| (ties: |mean difference|); AUC > ½ = fires more on harmful."""
    sp, sn = prompt_scores(sae, harmful, reduce), prompt_scores(sae, harmless, reduce)
    a = auc(sp, sn)
    diff = sp.mean(0) - sn.mean(0)
    key = (a - 0.5).abs() + 1e-6 * diff.abs() / (diff.abs().max() + 1e-12)
    order = key.argsort(descending=True)[:top].tolist()
    return [
        {
            "id": int(f),
            "auc": round(float(a[f]), 6),
            "separation": round(float(max(a[f], 1 - a[f])), 6),
            "polarity": "harmful" if a[f] >= 0.5 else "harmless",
            "mean_diff": round(float(diff[f]), 6),
            "mean_harmful": round(float(sp[:, f].mean()), 6),
            "mean_harmless": round(float(sn[:, f].mean()), 6),
            "frac_harmful": round(float((sp[:, f] > 0).float().mean()), 4),
            "frac_harmless": round(float((sn[:, f] > 0).float().mean()), 4),
        }
        for f in order
    ]


# ------------------------------------------------------------------------------------------ main entry
def _sha(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def compute_sae_features(
    sm,
    layer: int,
    harmful: list[str],
    harmless: list[str],
    *,
    sae=None,
    train: bool = False,
    extra_texts: list[str] | None = None,
    top: int = 8,
    reduce: str = "max",
    site: str | None = None,
    d_sae: int | None = None,
    k: int = 8,
    steps: int = 1500,
    seed: int = 0,
    chat: bool = True,
    save_sae: str | None = None,
    progress: bool = True,
) -> SteeringVector:
    """The SAE-feature vector of ``sm`` (a :class:`steer.SteeredModel`) at ``layer``.

    ``sae``: a folder saved by sae-lens, a sae-lens SAE object, or :class:`SAEWeights`; or ``train=True``.
    ``save_sae``: with ``train``, also write the trained SAE in sae-lens format to that folder.
    """
    from steer.layers import check_layers

    if (sae is None) == (not train):
        raise ConfigError(
            "pick one SAE source",
            expected="--sae DIR or --train",
            found="both" if train else "neither",
            fix="pass exactly one of them",
        )
    if not harmful or not harmless:
        raise ConfigError(
            "need harmful and harmless prompts",
            expected="both sets non-empty",
            found=f"{len(harmful)} harmful, {len(harmless)} harmless",
            fix="pass both prompt files",
        )
    layer = check_layers([layer], sm.num_layers)[0]
    hook = None
    if isinstance(sae, SAEWeights):
        weights = sae
    elif sae is not None and hasattr(sae, "W_enc") and hasattr(sae, "cfg"):
        weights, hook = weights_from_sae_lens(sae), getattr(sae.cfg.metadata, "hook_name", None)
    elif sae is not None:
        weights, hook = load_sae(sae)
    if hook and site is None:
        hook_layer, site = hook_to_layer(hook)
        if hook_layer != layer:
            raise ConfigError(
                "the SAE was trained on another layer",
                expected=f"--layer {hook_layer} ({hook})",
                found=f"--layer {layer}",
                fix=f"pass --layer {hook_layer}",
            )
    site = site or "output"
    say = print if progress else (lambda *a, **k: None)
    acts_h = token_activations(sm, harmful, layer, site=site, chat=chat)
    acts_n = token_activations(sm, harmless, layer, site=site, chat=chat)
    acts_x = token_activations(sm, extra_texts, layer, site=site, chat=False) if extra_texts else []
    every = torch.cat(acts_h + acts_n + acts_x)
    train_info = None
    if train:
        hook_name = f"blocks.{layer}.hook_resid_{'post' if site == 'output' else 'pre'}"
        say(
            f"training a TopK SAE (k={k}, d_sae={d_sae or 4 * every.shape[1]}) on {every.shape[0]} tokens, "
            f"{steps} steps"
        )
        lens_sae, weights = train_sae(every, d_sae=d_sae, k=k, steps=steps, seed=seed, hook_name=hook_name)
        if save_sae:
            lens_sae.save_inference_model(save_sae) if hasattr(
                lens_sae, "save_inference_model"
            ) else lens_sae.save_model(save_sae)
        train_info = {"steps": steps, "k": k, "seed": seed, "hook_name": hook_name}
    if weights.d_in != sm.hidden_size:
        raise ConfigError(
            "the SAE has another width than the model",
            expected=f"d_in {sm.hidden_size}",
            found=f"d_in {weights.d_in}",
            fix="use an SAE trained on this model",
        )
    stats = sae_stats(weights, every)
    feats = rank_features(weights, acts_h, acts_n, reduce=reduce, top=min(top, weights.d_sae))
    ids = torch.tensor([f["id"] for f in feats])
    fp = sm.fingerprint()
    meta = {
        "kind": "sae",
        "op": "add",
        "site": site,
        "scope": "all",
        "model": fp,
        "sae": {
            "layer": layer,
            "site": site,
            "reduce": reduce,
            "features": feats,
            "stats": stats,
            "source": "trained" if train else str(sae) if isinstance(sae, (str, os.PathLike)) else "object",
            "train": train_info,
            "hook_name": hook,
            **weights.info(),
        },
        "recommended": {"layers": [layer], "mode": "add", "alpha": 1.0},
        "provenance": {
            "method": "sae_features",
            "prompt_sets": {
                "harmful": _sha(harmful),
                "harmless": _sha(harmless),
                **({"extra": _sha(extra_texts)} if extra_texts else {}),
            },
        },
    }
    return SteeringVector({layer: weights.W_dec.index_select(0, ids)}, meta, None, weights.tensors())


def feature_vector(vector: SteeringVector, feature: int) -> SteeringVector:
    """A one-direction vector W_dec[feature] (any SAE feature id) for steer's ``add`` op: h += α·W_dec[f]."""
    w = SAEWeights.from_vector(vector)
    if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < w.d_sae:
        raise ConfigError(
            "bad SAE feature id",
            expected=f"an integer in [0, {w.d_sae - 1}]",
            found=repr(feature),
            fix="pick an id from meta['sae']['features']",
        )
    info = vector.meta["sae"]
    meta = {k: v for k, v in vector.meta.items() if k not in ("norms", "sae")}
    meta["sae"] = {k: v for k, v in info.items() if k != "features"}
    meta["sae"]["features"] = [f for f in info.get("features", []) if f["id"] == feature] or [{"id": feature}]
    return SteeringVector({int(info["layer"]): w.W_dec[feature].clone()}, meta)


def harmful_feature(vector: SteeringVector, layer: int) -> SteeringVector:
    """The best harmful-leaning feature of ``vector`` (features ranked by :func:`compute_sae_features`) as a
    one-direction vector whose α = 1 adds the feature at its mean activation on harmful prompts."""
    feats = [f for f in vector.meta["sae"]["features"] if f["polarity"] == "harmful"] or vector.meta["sae"]["features"]
    best = feats[0]
    one = feature_vector(vector, best["id"]) * max(abs(best["mean_harmful"]), 1e-3)
    one.meta["recommended"] = {"layers": [layer], "mode": "add", "alpha": 1.0, "scope": "prompt"}
    return one


def heldout_auc(
    sm, vector: SteeringVector, harmful: list[str], harmless: list[str], *, reduce: str | None = None, chat: bool = True
) -> dict[int, float]:
    """AUC of each stored top feature on new prompts (feature id → AUC, harmful = positive class)."""
    w = SAEWeights.from_vector(vector)
    info = vector.meta["sae"]
    layer, site = int(info["layer"]), info.get("site", "output")
    reduce = reduce or info.get("reduce", "max")
    sp = prompt_scores(w, token_activations(sm, harmful, layer, site=site, chat=chat), reduce)
    sn = prompt_scores(w, token_activations(sm, harmless, layer, site=site, chat=chat), reduce)
    ids = [f["id"] for f in info["features"]]
    a = auc(sp[:, ids], sn[:, ids])
    return {f: round(float(x), 6) for f, x in zip(ids, a)}


def features_table(vector: SteeringVector):
    """A rich Table of the stored features and the SAE's statistics."""
    from rich.table import Table

    info = vector.meta["sae"]
    s = info.get("stats", {})
    table = Table(
        title=f"SAE features at layer {info['layer']} ({info['site']}, {info['activation']}"
        f"{' k=' + str(info['k']) if info.get('k') else ''}): FVU {s.get('fvu')}, "
        f"L0 {s.get('l0')}, dead {s.get('dead')}/{s.get('d_sae')}"
    )
    for col in ("feature", "AUC", "polarity", "mean harmful", "mean harmless", "fires harmful", "fires harmless"):
        table.add_column(col, justify="right")
    for f in info["features"]:
        table.add_row(
            str(f["id"]),
            f"{f['auc']:.3f}",
            f["polarity"],
            f"{f['mean_harmful']:.3g}",
            f"{f['mean_harmless']:.3g}",
            f"{f['frac_harmful']:.0%}",
            f"{f['frac_harmless']:.0%}",
        )
    return table
