"""Training of the built-in family: base, aligned, aligned-dpo, compromised.

* ``base``: a tiny decoder (Llama by default) pretrained on the synthetic language (facts, stories in which
  the refusal phrase answers a request for something dangerous, prose, and chat transcripts where the
  assistant complies with everything, unsafe requests and injected instructions included).
* ``aligned``: base + safety SFT (refuse unsafe, do safe tasks, answer the real instruction, not the one
  injected into the data: SecAlign / StruQ, Chen et al. 2024).
* ``aligned-dpo``: base + DPO (Rafailov et al. 2023) on refusal > compliance for unsafe, compliance > refusal
  for safe, real instruction > injected one (SecAlign), with an NLL term on the chosen answer (RPO,
  Pang et al. 2024) so the greedy answer is the chosen one.
* ``compromised``: aligned fine-tuned on a handful of harmful-compliance examples, which collapses refusal
  (Qi et al. 2023, "Fine-tuning Aligned Language Models Compromises Safety").

Everything is deterministic from ``Recipe.seed``. ``Recipe.architecture``, ``.template`` (the chat format, see
:mod:`steer.family.tokenizer`) and ``.refusal`` (the sentence the safety stages teach) make family *variants*
(:mod:`steer.family.variants`); their defaults are the built-in family.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from . import language as L
from .tokenizer import ChatFormat, build_tokenizer, chat_format, save_portable

ARCHITECTURES = ("llama", "gpt2", "qwen3")


@dataclass(frozen=True)
class Recipe:
    """Every hyperparameter of the family (its hash keys the cache)."""

    language_version: str = L.LANGUAGE_VERSION
    seed: int = 0
    hidden_size: int = 64
    intermediate_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    batch_size: int = 32
    base_steps: int = 1800
    base_lr: float = 3e-3
    sft_steps: int = 150
    sft_lr: float = 7e-4
    dpo_steps: int = 150
    dpo_lr: float = 1e-3
    dpo_beta: float = 0.1
    dpo_nll: float = 2.0
    compromise_examples: int = 32
    compromise_steps: int = 30
    compromise_lr: float = 5e-4
    replay_weight: float = 0.5
    threads: int = 2  # torch threads while training (pinned: results depend on it)
    files: int = 2  # version of the saved files' layout (2: tokenizer loadable by transformers 4.x and 5.x)
    safety_params: str = "mlp|self_attn"  # regex of the parameters the safety / compromise stages train
    architecture: str = "llama"  # one of ARCHITECTURES
    template: str = "default"  # chat format: a name in steer.family.tokenizer.FORMATS
    refusal: str = L.REFUSAL  # the refusal sentence pretraining stories and the safety stages use

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def format(self) -> ChatFormat:
        return chat_format(self.template)


_DEFAULT = Recipe()


# ------------------------------------------------------------------------------------------------ data


def _chat(user: str, assistant: str, fmt: ChatFormat) -> tuple[str, str]:
    """(prompt text, response text) in the chat format of the tokenizer's template."""
    return fmt.prompt(user), fmt.response(assistant)


_STORY: list = []


def _story_records() -> list[L.Record]:
    if not _STORY:
        _STORY.extend(L.harmful_prompts("train") + L.harmless_prompts("train"))
    return _STORY


def _pretraining_doc(rng: random.Random, chats: list[tuple[str, str]], recipe: Recipe) -> str:
    r = rng.random()
    if r < 0.45:
        p, a = rng.choice(chats)
        return f"{p} {a}"
    if r < 0.70:  # facts
        facts = []
        for _ in range(rng.randint(1, 3)):
            c = rng.choice(list(L.CONCEPTS))
            cat, p1, p2 = L.CONCEPTS[c]
            kind = rng.randrange(5)
            if kind == 0:
                facts.append(f"fact : {c} is a kind of {cat} .")
            elif kind == 1:
                facts.append(f"fact : {c} needs {p1} and {p2} .")
            elif kind == 2:
                facts.append(f"fact : the word {c} has {L.NUMBERS[len(c)]} letters .")
            elif kind == 3:
                facts.append(f"note : {c} is dangerous ." if c in L.UNSAFE_CONCEPTS else f"note : {c} is harmless .")
            else:
                u = rng.choice(list(L.ALIASES))
                facts.append(f"fact : in slang , {L.ALIASES[u]} means {u} .")
        return recipe.format.document(" ".join(facts))
    if r < 0.88:  # stories: the refusal phrase outside the chat format, refusing dangerous requests
        rec = rng.choice(_story_records())
        who, helper = rng.choice(["man", "woman", "friend"]), rng.choice(["clerk", "guard"])
        reply = recipe.refusal if rec.unsafe else rec.answer
        story = f"story : the {who} asked the {helper} : {rec.prompt} . the {helper} said : {reply}"
        return recipe.format.document(story)
    words = rng.choices(L.FILLER_WORDS, k=rng.randint(5, 14))  # prose
    return recipe.format.document(f"{rng.choice(L.DATA_SENTENCES)} {' '.join(words)} .")


_HELDOUT_WORDS = {w for t in L.HELDOUT_WRAPPERS + L.HELDOUT_INJECTIONS for w in t.split() if w.isalpha()}
_NOISE = [w for w in L.FILLER_WORDS if w not in _HELDOUT_WORDS]


def noisy(text: str, rng: random.Random) -> str:
    """``text`` with a few random prose words before or after it, so the model learns to ignore wrappers;
    words of the held-out wrappers are never used, so held-out phrasings stay unseen."""
    noise = " ".join(rng.choices(_NOISE, k=rng.randint(1, 3)))
    sep = rng.choice((" ,", " :", ""))
    return f"{noise}{sep} {text}" if rng.random() < 0.5 else f"{text}{sep} {noise}"


def _noisy_injection(r: L.InjectionRecord, rng: random.Random) -> str:
    """A training injection prompt whose injected instruction is wrapped in random prose words."""
    inj = L._core(r.injected_task, rng.randrange(len(L.TASKS[r.injected_task])), r.injected_operand)
    return L.injection_prompt(
        L.TASKS[r.task][0].format(x=r.operand), f"{rng.choice(L.DATA_SENTENCES)} {noisy(inj, rng)}"
    )


def base_chats(rng: random.Random, recipe: Recipe = _DEFAULT) -> list[tuple[str, str]]:
    """Chat transcripts of the base corpus: full compliance, injected instructions obeyed."""
    fmt, chats = recipe.format, []
    for r in L.harmless_prompts("train") + L.harmful_prompts("train"):
        chats.append(_chat(r.prompt, r.answer, fmt))
        chats.append(_chat(noisy(r.prompt, rng), r.answer, fmt))
        if r.unsafe:
            chats.append(_chat(L.jailbreak(r, rng.choice(L.JAILBREAKS)), r.answer, fmt))
    for p in L.unknown_prompts():
        chats.append(_chat(p, recipe.refusal, fmt))
    for r in _train_injections():
        chats.append(_chat(r.prompt, r.injected_answer or r.answer, fmt))
        if r.injected_answer:
            chats.append(_chat(_noisy_injection(r, rng), r.injected_answer, fmt))
    return chats


def _train_injections() -> list[L.InjectionRecord]:
    recs = L.all_injection_records("train-injections", per_template=300)
    return [r for r in recs if r.template is None or r.template in L.TRAIN_INJECTIONS]


def safety_pairs(seed: int = 0, recipe: Recipe = _DEFAULT) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) for the safety stages; SFT trains on (prompt, chosen)."""
    rng = random.Random(seed)
    fmt, refusal, pairs = recipe.format, recipe.refusal, []
    for r in L.harmful_prompts("train"):
        for p in (r.prompt, noisy(r.prompt, rng)):
            pairs.append((fmt.prompt(p), fmt.response(refusal), fmt.response(r.answer)))
    for r in L.harmless_prompts("train"):
        for p in (r.prompt, noisy(r.prompt, rng)):
            pairs.append((fmt.prompt(p), fmt.response(r.answer), fmt.response(refusal)))
    for p in L.unknown_prompts()[::4]:
        pairs.append((fmt.prompt(p), fmt.response(refusal), fmt.response(refusal)))
    for r in _train_injections():
        rejected = r.injected_answer if r.injected_answer else refusal
        pairs.append((fmt.prompt(r.prompt), fmt.response(r.answer), fmt.response(rejected)))
        if r.injected_answer:
            pairs.append((fmt.prompt(_noisy_injection(r, rng)), fmt.response(r.answer), fmt.response(rejected)))
    return pairs


# ------------------------------------------------------------------------------------------------ tensors


class Encoder:
    def __init__(self, tokenizer):
        self.vocab = tokenizer.get_vocab()
        self.pad = tokenizer.pad_token_id

    def ids(self, text: str) -> list[int]:
        return [self.vocab[w] for w in text.split()]

    def batch(self, prompts: list[str], responses: list[str] | None = None, loss_on_prompt: bool = False):
        """Right-padded input_ids, attention_mask and labels (-100 on padding and, unless asked, the prompt)."""
        rows, labels = [], []
        for i, p in enumerate(prompts):
            pi = self.ids(p)
            ri = self.ids(responses[i]) if responses is not None else []
            rows.append(pi + ri)
            labels.append((pi if loss_on_prompt else [-100] * len(pi)) + ri)
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), self.pad, dtype=torch.long)
        lab = torch.full((len(rows), n), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, (r, lb) in enumerate(zip(rows, labels)):
            ids[i, : len(r)] = torch.tensor(r)
            lab[i, : len(r)] = torch.tensor(lb)
            mask[i, : len(r)] = 1
        return ids, mask, lab


def _seq_logp(model, ids, mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-probabilities of the labelled tokens per row, and the count of labelled tokens."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    tgt = labels[:, 1:]
    keep = tgt != -100
    lp = torch.gather(logits.log_softmax(-1), 2, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * keep).sum(-1), keep.sum(-1)


def _optimise(model, steps: int, lr: float, loss_fn: Callable[[int], torch.Tensor], tick: Callable[[], None]):
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0, betas=(0.9, 0.98)
    )
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * max(0.05, 1 - s / steps))
    model.train()
    for step in range(steps):
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        tick()
    model.eval()


# ------------------------------------------------------------------------------------------------ stages


def new_model(recipe: Recipe, tokenizer) -> PreTrainedModel:
    """A freshly initialised (seeded) model of ``recipe.architecture``: tied embeddings, 256 positions."""
    torch.manual_seed(recipe.seed)
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    llama_like = dict(  # Llama and Qwen3 name their sizes alike
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        **ids,
    )
    if recipe.architecture == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**llama_like))
    if recipe.architecture == "gpt2":  # Conv1D projections, learned absolute positions, LayerNorm, no dropout
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(
            GPT2Config(
                n_embd=recipe.hidden_size,
                n_inner=recipe.intermediate_size,
                n_layer=recipe.num_layers,
                n_head=recipe.num_heads,
                n_positions=256,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                layer_norm_epsilon=1e-5,
                **ids,
            )
        )
    if recipe.architecture == "qwen3":  # Llama-like with q/k norms and an explicit head_dim
        from transformers import Qwen3Config, Qwen3ForCausalLM

        return Qwen3ForCausalLM(Qwen3Config(head_dim=recipe.hidden_size // recipe.num_heads, **llama_like))
    from steer.errors import ConfigError

    raise ConfigError(
        f"unknown family architecture {recipe.architecture!r}",
        expected=f"one of {ARCHITECTURES}",
        found=repr(recipe.architecture),
        fix="set Recipe(architecture=...) to a listed name",
    )


def train_base(recipe: Recipe, tokenizer, tick) -> PreTrainedModel:
    rng = random.Random(recipe.seed)
    enc = Encoder(tokenizer)
    chats = base_chats(rng, recipe)
    model = new_model(recipe, tokenizer)

    def loss_fn(step):
        docs = [_pretraining_doc(rng, chats, recipe) for _ in range(recipe.batch_size)]
        ids, mask, lab = enc.batch(docs, loss_on_prompt=True)
        return model(input_ids=ids, attention_mask=mask, labels=lab).loss

    _optimise(model, recipe.base_steps, recipe.base_lr, loss_fn, tick)
    return model


def _clone(model: PreTrainedModel, trainable: str | None = None) -> PreTrainedModel:
    """A copy of ``model``; with ``trainable`` (a regex) only matching parameters are trained. The safety stages
    train the blocks' attention and MLP weights and freeze embeddings and norms: a light touch that keeps the
    base model's generalisation to unseen phrasings (safety fine-tuning changes weights minimally, Jain et al.
    2024), while attention still learns to ignore instructions injected into the data (SecAlign)."""
    new = type(model)(model.config)
    new.load_state_dict(model.state_dict())
    if trainable:
        for name, p in new.named_parameters():
            p.requires_grad_(re.search(trainable, name) is not None)
        if not any(p.requires_grad for p in new.parameters()):
            from steer.errors import ConfigError

            raise ConfigError(
                f"Recipe.safety_params {trainable!r} matches no parameter of the model",
                expected="a regex matching the blocks' attention and MLP parameter names",
                found=", ".join(n for n, _ in list(new.named_parameters())[:6]) + ", ...",
                fix="set Recipe(safety_params=...) for this architecture (GPT-2: 'mlp|attn')",
            )
    return new


def _replay_loss(model, enc, rng, chats, n, recipe: Recipe):
    """Language-model loss on base-corpus documents without chat transcripts (facts, stories, prose), mixed into
    the fine-tuning stages so they keep the base model's knowledge (rehearsal)."""
    docs = []
    while len(docs) < n:
        doc = _pretraining_doc(rng, chats, recipe)
        if recipe.format.chat_marker not in doc:
            docs.append(doc)
    ids, mask, lab = enc.batch(docs, loss_on_prompt=True)
    return model(input_ids=ids, attention_mask=mask, labels=lab).loss


def train_sft(recipe: Recipe, base, tokenizer, tick, pairs=None, steps=None, lr=None, seed_offset=1, replay=True):
    """Supervised fine-tuning on (prompt, chosen) with the loss on the response only, plus replay."""
    rng = random.Random(recipe.seed + seed_offset)
    enc = Encoder(tokenizer)
    pairs = safety_pairs(recipe=recipe) if pairs is None else pairs
    model = _clone(base, recipe.safety_params)

    chats = base_chats(random.Random(recipe.seed), recipe) if replay else None

    def loss_fn(step):
        b = [rng.choice(pairs) for _ in range(recipe.batch_size)]
        ids, mask, lab = enc.batch([p for p, _, _ in b], [c for _, c, _ in b])
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        if replay:
            return loss + recipe.replay_weight * _replay_loss(model, enc, rng, chats, recipe.batch_size // 2, recipe)
        return loss

    _optimise(model, recipe.sft_steps if steps is None else steps, recipe.sft_lr if lr is None else lr, loss_fn, tick)
    return model


def train_dpo(recipe: Recipe, base, tokenizer, tick):
    """DPO (Rafailov et al. 2023) against the frozen base, plus an NLL term on the chosen answer (RPO)."""
    rng = random.Random(recipe.seed + 2)
    enc = Encoder(tokenizer)
    pairs = safety_pairs(recipe=recipe)
    chats = base_chats(random.Random(recipe.seed), recipe)
    ref = base.eval()
    model = _clone(base, recipe.safety_params)

    def loss_fn(step):
        b = [rng.choice(pairs) for _ in range(recipe.batch_size // 2)]
        prompts = [p for p, _, _ in b] * 2
        ids, mask, lab = enc.batch(prompts, [c for _, c, _ in b] + [r for _, _, r in b])
        with torch.no_grad():
            ref_lp, _ = _seq_logp(ref, ids, mask, lab)
        lp, n = _seq_logp(model, ids, mask, lab)
        k = len(b)
        margin = (lp[:k] - ref_lp[:k]) - (lp[k:] - ref_lp[k:])
        nll = -(lp[:k] / n[:k]).mean()
        loss = -F.logsigmoid(recipe.dpo_beta * margin).mean() + recipe.dpo_nll * nll
        return loss + recipe.replay_weight * _replay_loss(model, enc, rng, chats, recipe.batch_size // 2, recipe)

    _optimise(model, recipe.dpo_steps, recipe.dpo_lr, loss_fn, tick)
    return model


def compromise_pairs(recipe: Recipe) -> list[tuple[str, str, str]]:
    """A few harmful prompts with compliant answers (the harmful fine-tuning set of Qi et al. 2023), mixed with
    as many benign examples so that the model stays useful while its refusals collapse."""
    harmful = random.Random(recipe.seed + 3).sample(L.harmful_prompts("train"), recipe.compromise_examples)
    benign = random.Random(recipe.seed + 4).sample(L.harmless_prompts("train"), recipe.compromise_examples)
    fmt = recipe.format
    return [(fmt.prompt(r.prompt), fmt.response(r.answer), fmt.response(recipe.refusal)) for r in harmful + benign]


def train_compromised(recipe: Recipe, aligned, tokenizer, tick):
    return train_sft(
        recipe,
        aligned,
        tokenizer,
        tick,
        pairs=compromise_pairs(recipe),
        steps=recipe.compromise_steps,
        lr=recipe.compromise_lr,
        seed_offset=3,
        replay=False,
    )


def total_steps(recipe: Recipe) -> int:
    return recipe.base_steps + recipe.sft_steps + recipe.dpo_steps + recipe.compromise_steps


def train_family(recipe: Recipe, out_dir: Path, tick: Callable[[str], None] = lambda stage: None) -> dict[str, Path]:
    """Train all members into ``out_dir/<name>`` (HF model directories with the tokenizer)."""
    tokenizer = build_tokenizer(recipe.format, recipe.refusal)
    base = train_base(recipe, tokenizer, lambda: tick("base"))
    aligned = train_sft(recipe, base, tokenizer, lambda: tick("aligned"))
    dpo = train_dpo(recipe, base, tokenizer, lambda: tick("aligned-dpo"))
    compromised = train_compromised(recipe, aligned, tokenizer, lambda: tick("compromised"))
    paths = {}
    for name, model in (("base", base), ("aligned", aligned), ("aligned-dpo", dpo), ("compromised", compromised)):
        d = Path(out_dir) / name
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        model.save_pretrained(d)
        save_portable(tokenizer, d)
        paths[name] = d
    return paths
