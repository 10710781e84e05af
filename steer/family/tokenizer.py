"""Word-level tokenizer of the synthetic language, as a ``transformers`` fast tokenizer with a chat template.

One token per word of :func:`steer.family.language.vocabulary`; special tokens ``<pad> <unk> <s> </s>``
(plain text gets a leading ``<s>``, as Llama's tokenizer does) and the
role markers ``<|user|> <|assistant|>``. A chat turn is ``<|role|> content </s>``; ``</s>`` is also the EOS, so
greedy generation stops at the end of the assistant turn. Padding is on the left (batched generation).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .language import vocabulary

PAD, UNK, BOS, EOS, USER, ASSISTANT = "<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"
SPECIALS = (PAD, UNK, BOS, EOS, USER, ASSISTANT)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' ' + eos_token + ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The family's tokenizer (deterministic: the vocabulary is sorted)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(vocabulary()))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    # like Llama: plain text gets a leading BOS (chat templates write their own; tokenize those with
    # add_special_tokens=False, as apply_chat_template does)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT], padding_side="left", model_max_length=256,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def chat_text(user: str, assistant: str | None = None) -> str:
    """The chat-formatted text of one exchange (``assistant=None``: up to the generation prompt)."""
    text = f"{BOS}{USER} {user} {EOS} {ASSISTANT}"
    return text if assistant is None else f"{text} {assistant} {EOS}"


def save_portable(tokenizer, directory) -> None:
    """Save the tokenizer so that transformers 4.x and 5.x both load it: transformers 5 writes
    ``tokenizer_class: TokenizersBackend`` and a list of ``extra_special_tokens``, which 4.x cannot read."""
    import json
    from pathlib import Path

    tokenizer.save_pretrained(directory)
    path = Path(directory) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        config["additional_special_tokens"] = extra
    elif isinstance(extra, dict):
        config["extra_special_tokens"] = extra
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
