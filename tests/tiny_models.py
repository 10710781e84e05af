"""Tiny random causal LMs built from configs (no downloads), one per supported architecture family."""

from __future__ import annotations

import torch
import transformers as tf

V, D, L, H = 96, 32, 4, 4  # vocab, hidden, layers, heads


def _cfg(name: str):
    common = dict(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=48,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    if name == "llama":
        return tf.LlamaConfig(**common)
    if name == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if name == "qwen2":
        return tf.Qwen2Config(**common)
    if name == "qwen3":
        return tf.Qwen3Config(**common, head_dim=8)
    if name == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **common, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=1
        )
    if name == "mixtral":
        return tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    if name == "gemma2":
        return tf.Gemma2Config(**common, head_dim=8)
    if name == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=8)
    if name == "phi3":
        return tf.Phi3Config(**common)
    if name == "gpt2":
        return tf.GPT2Config(
            vocab_size=V, n_embd=D, n_layer=L, n_head=H, n_positions=128, pad_token_id=0, eos_token_id=1, bos_token_id=2
        )
    if name == "gpt_neox":
        return tf.GPTNeoXConfig(
            vocab_size=V,
            hidden_size=D,
            num_hidden_layers=L,
            num_attention_heads=H,
            intermediate_size=48,
            max_position_embeddings=128,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
    if name == "opt":
        return tf.OPTConfig(
            vocab_size=V,
            hidden_size=D,
            num_hidden_layers=L,
            num_attention_heads=H,
            ffn_dim=48,
            word_embed_proj_dim=D,
            max_position_embeddings=128,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
    if name == "falcon":
        return tf.FalconConfig(
            vocab_size=V,
            hidden_size=D,
            num_hidden_layers=L,
            num_attention_heads=H,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
    raise KeyError(name)


ARCHS = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "mixtral",
    "gemma2",
    "gemma3",
    "phi3",
    "gpt2",
    "gpt_neox",
    "opt",
    "falcon",
)


def tiny_model(name: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    cfg = _cfg(name)
    if name == "gemma3":
        model = tf.Gemma3ForCausalLM(cfg)
    else:
        model = tf.AutoModelForCausalLM.from_config(cfg)
    return model.float().eval()


def wide_model(name: str = "llama", seed: int = 0):
    """Like :func:`tiny_model` but 64 wide with 2 heads of 32 and 3 layers: vLLM's CPU attention refuses head
    sizes of 16 and below (tests/test_vllm_*.py)."""
    torch.manual_seed(seed)
    ids = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if name == "gpt2":
        cfg = tf.GPT2Config(vocab_size=V, n_embd=64, n_layer=3, n_head=2, n_positions=256, **ids)
        return tf.GPT2LMHeadModel(cfg).float().eval()
    if name == "opt":
        cfg = tf.OPTConfig(
            vocab_size=V, hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=2,
            word_embed_proj_dim=64, max_position_embeddings=256, **ids,
        )  # fmt: skip
        return tf.OPTForCausalLM(cfg).float().eval()
    common = dict(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, **ids,
    )  # fmt: skip
    if name == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=32)).float().eval()
    return tf.LlamaForCausalLM(tf.LlamaConfig(**common)).float().eval()


def tiny_tokenizer():
    """A word-level tokenizer over the tiny vocab ('w0' .. 'w95'), left padding, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<eos>", "<bos>"] + [f"w{i}" for i in range(3, V)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w3"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="w3",
        padding_side="left",
    )
    tok.chat_template = (
        "{% for m in messages %}w4 {{ m['content'] }} w5 {% endfor %}{% if add_generation_prompt %}w6 {% endif %}"
    )
    return tok


def save_tiny(path, name: str = "llama"):
    model, tok = tiny_model(name), tiny_tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
