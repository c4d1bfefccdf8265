"""Tokenizer: an HF `tokenizer.json` run by `tokenizers`, and the chat template rendered by jinja2.

Text -> ids is whatever `tokenizer.json` says (normalizer, pre-tokenizer, BPE model, added tokens,
post-processor); we call the Rust `tokenizers` library directly, so ids and decoded strings equal
transformers' fast tokenizer on the same directory. (transformers 5 ignores
`clean_up_tokenization_spaces` for BPE tokenizers, so decode needs no clean-up pass either.)

The chat template is a jinja2 program over `messages` (a list of {"role", "content"} dicts). It is
rendered in the environment transformers uses: sandboxed, `trim_blocks` and `lstrip_blocks` on,
the `loopcontrols` extension, a `tojson` filter that keeps non-ASCII text, and the globals
`raise_exception`, `strftime_now`, `dict` and `namespace`; the named special tokens
(`bos_token`, `eos_token`, ...) are template variables too.

GGUF files carry no `tokenizer.json`; `byte_level_bpe` rebuilds one from the GGUF vocabulary for
`tokenizer.ggml.model == "gpt2"`, the way transformers' GGUF converter does.
"""

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

# The special-token names transformers exposes to chat templates.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# llama.cpp token types (gguf.TokenType): CONTROL tokens are special, USER_DEFINED ones are added.
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4


class Tokenizer:
    def __init__(self, backend: tokenizers.Tokenizer, special_tokens: dict[str, str], chat_template: str | None):
        self.backend = backend
        self.special_tokens = special_tokens  # {"bos_token": "<|im_start|>", ...}, only those set
        self.chat_template = chat_template
        self.bos_token_id = self._id_of("bos_token")
        self.eos_token_id = self._id_of("eos_token")
        self.pad_token_id = self._id_of("pad_token")
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Read `tokenizer.json`, `tokenizer_config.json` and the chat template from an HF directory."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        special = {}
        for name in SPECIAL_TOKEN_NAMES:
            token = config.get(name, special_map.get(name))
            if isinstance(token, dict):  # serialised AddedToken
                token = token["content"]
            if token is not None:
                special[name] = token
        template = config.get("chat_template")
        if (path / "chat_template.jinja").is_file():  # transformers 5 saves the template here
            template = (path / "chat_template.jinja").read_text()
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{path / 'tokenizer_config.json'}: chat_template must be a string, got {template!r:.80}")
        return cls(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")), special, template)

    def _id_of(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{name} {token!r} is not in the vocabulary")
        return token_id

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat as one string, exactly as transformers' `apply_chat_template(tokenize=False)`."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json / chat_template.jinja)")
        return self._template.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.special_tokens)

    @cached_property
    def _template(self) -> jinja2.Template:
        return _jinja_env().from_string(self.chat_template)

    def save(self, path: str | Path, model_max_length: int | None = None):
        """Write tokenizer.json and tokenizer_config.json (with the chat template) into `path`."""
        path = Path(path)
        self.backend.save(str(path / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  **self.special_tokens}
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; chat templates expect plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _jinja_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=dict, namespace=jinja2.utils.Namespace)
    return env


# ---------------------------------------------------------------------------------------
# GGUF vocabulary -> byte-level BPE


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable bytes map to themselves, the rest to chr(256+n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + n)
    return chars


def byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int],
                   bos_token: str | None = None) -> tokenizers.Tokenizer:
    """A GPT-2 style byte-level BPE from a GGUF vocabulary (id = position in `tokens`).

    Tokens are spelled in GPT-2's byte alphabet; the odd token that is not (llama.cpp writes some
    with raw characters) is respelled byte by byte, as transformers' converter does. CONTROL tokens
    become special added tokens and USER_DEFINED ones plain added tokens, so they are matched whole.
    With `bos_token`, encode(add_special_tokens=True) prepends it (GGUF `add_bos_token`).
    """
    spell = bytes_to_unicode()
    alphabet = set(spell.values())
    spelled = [t if set(t) <= alphabet else "".join(spell[b] for b in t.encode()) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    if len(vocab) != len(tokens):
        raise ValueError(f"GGUF vocabulary has duplicate tokens ({len(tokens) - len(vocab)} after respelling)")
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges],
                                              dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                                              fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    # a CONTROL token outside the byte alphabet is a llama.cpp mislabel; it stays a normal token
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, kind in zip(tokens, token_types) if kind == GGUF_CONTROL and set(t) <= alphabet])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, kind in zip(spelled, token_types) if kind == GGUF_USER_DEFINED])
    if bos_token is not None:
        bos = (bos_token, vocab[bos_token])
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_token}:0 $A:0", pair=f"{bos_token}:0 $A:0 {bos_token}:1 $B:1", special_tokens=[bos])
    return backend
