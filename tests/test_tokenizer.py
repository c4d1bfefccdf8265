"""zebra.tokenizer on the default teacher's directory against transformers' tokenizer on the same
directory (ids, decoded strings, special ids, chat template), and the converted tokenizer.json
against the tokenizer transformers builds straight from the GGUF file."""

import jinja2
import pytest
import transformers

from zebra.hub import fetch_gguf
from zebra.tokenizer import Tokenizer

TEXTS = [
    "Hello, world! The capital of France is Paris.",
    "naïve café – déjà vu; Ελληνικά, русский, 中文, 日本語, 한국어, עברית, العربية",
    "emoji 😀👍🏽🇫🇷 and ZWJ 👨‍👩‍👧‍👦 and a lone combining mark é",
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # comment\n\n\nclass A:\n    pass\n",
    "   leading spaces, trailing spaces   \n\n\n\t\t  mixed \r\n whitespace runs          end",
    "numbers 1234567890 3.14159 -42 1e-5 0x1F and dates 2024-11-23",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "special-looking but not: <|im_start and im_end|> <repo_name> <file_sep>",
    "",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime.  "}],
    [{"role": "user", "content": "Hi 😀"}, {"role": "assistant", "content": "Hello!\nHow can I help?"},
     {"role": "user", "content": "Write `print(1)` in Python."}],
]


@pytest.fixture(scope="module")
def ours(teacher_dir):
    return Tokenizer.from_dir(teacher_dir)


@pytest.fixture(scope="module")
def ref(teacher_dir):
    return transformers.AutoTokenizer.from_pretrained(teacher_dir)


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_ids_and_strings_match_transformers(ours, ref, add_special_tokens):
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=add_special_tokens)
        assert ids == ref(text, add_special_tokens=add_special_tokens)["input_ids"], text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
    assert ours.decode(ours.encode(TEXTS[2])) == TEXTS[2]  # byte-level BPE is lossless
    assert len(ours.encode("<|im_start|>user")) == 2  # special tokens stay whole


def test_special_ids_and_vocab_match_transformers(ours, ref):
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (ref.bos_token_id, ref.eos_token_id,
                                                                         ref.pad_token_id)
    assert ours.vocab_size == len(ref) == 49152
    assert ours.eos_token_id == ref.convert_tokens_to_ids("<|im_end|>")  # ChatML turns end with it


@pytest.mark.parametrize("chat", CHATS, ids=["user", "system", "multi-turn"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(ours, ref, chat, add_generation_prompt):
    text = ours.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
    assert text == ref.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ("<|im_start|>system\n" in text) and text.endswith("<|im_start|>assistant\n") == add_generation_prompt


# exercises the rendering environment: trim/lstrip blocks, tojson (non-ASCII kept), namespace,
# loop controls, special-token variables and raise_exception
ENV_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(n=0) %}
  {% for m in messages %}
    {% if m['role'] == 'tool' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    [{{ ns.n }}] {{ m['role'] | upper }}: {{ m['content'] | tojson }}{{ eos_token }}
    {% if loop.index > 3 %}{% break %}{% endif %}
  {% endfor %}
{% if messages[-1]['role'] == 'assistant' %}{{ raise_exception('last message must not be the assistant') }}{% endif %}
{% if add_generation_prompt %}ASSISTANT:{% endif %}"""


def test_template_environment_matches_transformers(ours, ref):
    tok = Tokenizer(ours.backend, ours.special_tokens, ENV_TEMPLATE)
    chat = [{"role": "system", "content": "Sé <b>bref</b> \"quoted\""}, {"role": "tool", "content": "skip"},
            *CHATS[2][:2], {"role": "user", "content": "x"}, {"role": "user", "content": "never shown"}]
    for gen in (False, True):
        want = ref.apply_chat_template(chat, chat_template=ENV_TEMPLATE, add_generation_prompt=gen, tokenize=False)
        assert tok.apply_chat_template(chat, add_generation_prompt=gen) == want
    with pytest.raises(jinja2.exceptions.TemplateError, match="must not be the assistant"):
        tok.apply_chat_template(CHATS[2][:2])


@pytest.mark.slow
def test_converted_tokenizer_matches_transformers_gguf_tokenizer(ours):
    """Our tokenizer.json (built from the GGUF vocabulary) against transformers' GGUF converter."""
    gguf_path = fetch_gguf("smollm2-135m-instruct")
    ref = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    for text in TEXTS:
        assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
    chat = ours.apply_chat_template(CHATS[2], add_generation_prompt=True)
    assert chat == ref.apply_chat_template(CHATS[2], add_generation_prompt=True, tokenize=False)
    assert ours.encode(chat) == ref(chat, add_special_tokens=False)["input_ids"]
