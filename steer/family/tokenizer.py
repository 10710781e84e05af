"""Word-level tokenizer of the synthetic language, as a ``transformers`` fast tokenizer with a chat template.

One token per word of :func:`steer.family.language.vocabulary` (plus the refusal sentence's and the chat
format's own words, for a family variant); the chat format (:class:`ChatFormat`) names the special tokens.

* ``default`` (the built-in family): ``<pad> <unk> <s> </s> <|user|> <|assistant|>``. A chat turn is
  ``<|role|> content </s>``; ``</s>`` is also the EOS, so greedy generation stops at the end of the assistant
  turn.
* ``chatml`` (a family variant): ChatML-like turns ``<|im_start|> role content <|im_end|>`` (the role is a
  plain word, as in ChatML), EOS ``<|im_end|>``, BOS ``<|startoftext|>`` written by the template.

Plain text gets a leading BOS (as Llama's tokenizer does); chat templates write their own. Padding is on the
left (batched generation).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .language import REFUSAL, vocabulary

PAD, UNK, BOS, EOS, USER, ASSISTANT = "<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"
SPECIALS = (PAD, UNK, BOS, EOS, USER, ASSISTANT)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' ' + eos_token + ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatFormat:
    """A chat format: special tokens, the text of one exchange, and the Jinja template that writes it.

    ``user`` / ``assistant`` open a turn (one or more words); ``eos`` ends every turn and every document.
    ``chat_marker`` is a token only chat transcripts contain (tells transcripts from plain documents).
    ``words`` are ordinary vocabulary words the format adds (ChatML's role names).
    """

    name: str
    pad: str
    unk: str
    bos: str
    eos: str
    user: str
    assistant: str
    chat_marker: str
    extra_specials: tuple[str, ...]
    words: tuple[str, ...]
    chat_template: str

    @property
    def specials(self) -> tuple[str, ...]:
        return (self.pad, self.unk, self.bos, self.eos) + self.extra_specials

    def prompt(self, user: str) -> str:
        """The training text of a user turn up to the generation prompt."""
        return f"{self.bos} {self.user} {user} {self.eos} {self.assistant}"

    def response(self, assistant: str) -> str:
        return f"{assistant} {self.eos}"

    def document(self, text: str) -> str:
        """A plain (non-chat) pretraining document."""
        return f"{self.bos} {text} {self.eos}"


DEFAULT = ChatFormat("default", PAD, UNK, BOS, EOS, USER, ASSISTANT, USER, (USER, ASSISTANT), (), CHAT_TEMPLATE)

# ChatML-like (OpenAI's ChatML, as used by Qwen), word level; the template writes the BOS and separates every
# token by one space, so it renders exactly the training text of ChatFormat.prompt / response
CHATML = ChatFormat(
    "chatml",
    "<|pad|>",
    "<|unk|>",
    "<|startoftext|>",
    "<|im_end|>",
    "<|im_start|> user",
    "<|im_start|> assistant",
    "<|im_start|>",
    ("<|im_start|>",),
    ("user", "assistant", "system"),
    "{{ bos_token + ' ' }}"
    "{% for message in messages %}"
    "{{ '<|im_start|> ' + message['role'] + ' ' + message['content'] + ' ' + eos_token + ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|> assistant' }}{% endif %}",
)

FORMATS = {f.name: f for f in (DEFAULT, CHATML)}


def chat_format(name: str) -> ChatFormat:
    """The chat format called ``name`` (a :class:`~steer.family.train.Recipe`'s ``template``)."""
    if name not in FORMATS:
        from steer.errors import ConfigError

        raise ConfigError(
            f"unknown family chat template {name!r}",
            expected=f"one of {', '.join(FORMATS)}",
            found=repr(name),
            fix="set Recipe(template=...) to a listed name",
        )
    return FORMATS[name]


def build_tokenizer(fmt: ChatFormat = DEFAULT, refusal: str = REFUSAL) -> PreTrainedTokenizerFast:
    """The family's tokenizer (deterministic: the vocabulary is sorted). The default format and refusal give the
    built-in family's vocabulary; others add their words (the built-in words keep their relative order)."""
    words = sorted(set(vocabulary()) | set(refusal.split()) | set(fmt.words))
    vocab = {tok: i for i, tok in enumerate(fmt.specials + tuple(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=fmt.unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    # like Llama: plain text gets a leading BOS (chat templates write their own; tokenize those with
    # add_special_tokens=False, as apply_chat_template does)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{fmt.bos} $A", pair=f"{fmt.bos} $A $B", special_tokens=[(fmt.bos, vocab[fmt.bos])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=fmt.bos,
        eos_token=fmt.eos,
        pad_token=fmt.pad,
        unk_token=fmt.unk,
        additional_special_tokens=list(fmt.extra_specials),
        padding_side="left",
        model_max_length=256,
    )
    fast.chat_template = fmt.chat_template
    return fast


def chat_text(user: str, assistant: str | None = None, fmt: ChatFormat = DEFAULT) -> str:
    """The chat-formatted text of one exchange (``assistant=None``: up to the generation prompt), as the
    tokenizer's chat template renders it (less the space the template writes after each turn)."""
    # the built-in template writes no space after the BOS (same tokens as the training text)
    text = f"{BOS}{USER} {user} {EOS} {ASSISTANT}" if fmt is DEFAULT else fmt.prompt(user)
    return text if assistant is None else f"{text} {assistant} {fmt.eos}"


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
