"""Training data: load rows, render chats, tokenise with loss masks, pack, shuffle, shard, resume.

Rows come from a local .json/.jsonl file (gzipped or not; read with the json module: no arrow
cache, errors name the line), a local .parquet file or a hub name (both through
`datasets.load_dataset`), in one of five schemas, detected from the columns or named by `schema=`:

    chat         messages: [{role, content}, ...]
    instruction  instruction [, input], output | response  ->  [user, assistant]
    text         text
    preference   prompt, chosen, rejected (strings, or message lists)
    hh           chosen, rejected: hh-rlhf transcripts "\\n\\nHuman: ...\\n\\nAssistant: ..."

For SFT a preference row is its prompt + chosen response (hh: the chosen transcript); for DPO a
whole-conversation pair splits into prompt = all but the last turn, responses = the last turns.

A chat is rendered with the teacher's chat template and tokenised with `loss_mask` True on
assistant tokens only. Exact assistant spans: the template renders the conversation prefix by
prefix; assistant turn i spans the characters between render(messages[:i], generation prompt)
and render(messages[:i+1]) (both checked to be prefixes of the full render). The text is then
encoded piece by piece between those boundaries, so every token lies wholly inside or outside
a span and the mask is exact by construction (no offset arithmetic, no BPE merge across a
boundary). In ChatML and Llama-3 templates the pieces meet at special tokens, so the ids equal one
encode of the whole render (tests check this, and the mask, for SmolLM2's tokenizer). The span includes what the template writes after the content (ChatML's
`<|im_end|>\\n`), so the model learns to stop. `assistant_only=False` is the official behaviour:
every token counts (OFFICIAL.md section 5). Text is encoded without added special tokens: the
template writes BOS itself where it has one (the official TRL packing adds another).

SFT packing (a token stream, shapes `n l`): each epoch permutes the samples with a generator
seeded by (seed, epoch), joins them with one EOS after each sample (the EOS inherits the mask of
the token before it: it is trained where the sample's end is trained), and cuts the stream into
windows of l + 1 tokens that overlap by one, as nanoGPT's x/y:

    input_ids[k] = stream[k l : k l + l],  targets[k] = stream[k l + 1 : k l + l + 1],
    loss_mask[k] = mask[k l + 1 : k l + l + 1]   (the mask of the token being predicted)

so every stream token but the first is a target exactly once; the tail shorter than a window is
dropped. The official TRL ConstantLengthDataset cuts disjoint chunks of l tokens with
labels = inputs, so the last position of each chunk is never a target; otherwise it is the
same packing (EOS between samples, no cross-document attention mask).

DPO pairs: prompt = render(prompt messages, generation prompt); each response = the rest of
render(prompt + response). Truncation follows TRL 0.8.6's DPOTrainer (keep_end): if
prompt + longer response > max_length the prompt keeps its last max_prompt_length tokens; if it
is still too long both responses keep their first max_length - max_prompt_length tokens. No
EOS is appended: the template's end of turn already closes the response. Sequences are right
padded, so a causal model needs no attention mask.

Batches (`Batches`): rows (packed windows or pairs) of one epoch form global batches of
batch_size * world_size consecutive rows; rank r takes the contiguous slice
[r * batch_size, (r + 1) * batch_size) of each. Hence for a fixed global batch the rows of
optimizer step s are the same for any world size and any split into accumulation steps. The
position `{"epoch", "index"}` (index = next row of the epoch, in rows, so it too does not depend
on the world size) restores the exact next batch; a tail shorter than a global batch is dropped.
"""

import gzip
import json
import re
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

SCHEMAS = ("chat", "instruction", "text", "preference", "hh")
ROLES = ("system", "user", "assistant")
LOCAL_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet")
HH_TURN = re.compile(r"\n\n(Human|Assistant):")


# ---------------------------------------------------------------------------------------------
# Loading and schemas


def read_json_rows(path: str | Path) -> list[dict]:
    """A .json (one array of objects, or one object per line) or .jsonl file, gzipped or not."""
    path = Path(path)
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        rows, where = json.loads(text), [f"{path} item {i}" for i in range(len(json.loads(text)))]
    else:
        rows, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path} line {n}: not valid JSON ({error})") from None
                where.append(f"{path} line {n}")
    for row, at in zip(rows, where):
        if not isinstance(row, dict):
            raise ValueError(f"{at}: expected a JSON object, got {type(row).__name__}")
    return rows


def load_rows(source: str, schema: str | None = None, split: str = "train") -> tuple[list[dict], str]:
    """Load a local file (by its suffix; `split` unused) or a hub dataset -> (rows, schema)."""
    path = Path(source)
    if source.endswith(LOCAL_SUFFIXES) or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"data file {source!r} {'is not a file' if path.exists() else 'does not exist'}")
        if not source.endswith(LOCAL_SUFFIXES):
            raise ValueError(f"{source}: expected a {', '.join(LOCAL_SUFFIXES)} file")
        if source.endswith(".parquet"):
            import datasets

            rows = list(datasets.load_dataset("parquet", data_files=str(path), split="train"))
        else:
            rows = read_json_rows(path)
    else:
        import datasets

        rows = list(datasets.load_dataset(source, split=split))
    if not rows:
        raise ValueError(f"{source}: no rows")
    columns = set().union(*(row.keys() for row in rows))
    if schema is None:
        schema = detect_schema(columns, source)
    if schema not in SCHEMAS:
        raise ValueError(f"{source}: unknown schema {schema!r}; expected one of {SCHEMAS}")
    return rows, schema


def detect_schema(columns: set[str], source: str) -> str:
    if "messages" in columns:
        return "chat"
    if {"prompt", "chosen", "rejected"} <= columns:
        return "preference"
    if {"chosen", "rejected"} <= columns:
        return "hh"
    if "instruction" in columns and columns & {"output", "response"}:
        return "instruction"
    if "text" in columns:
        return "text"
    raise ValueError(
        f"{source}: cannot tell the schema from the columns {sorted(columns)}; expected 'messages' (chat), "
        "'prompt'+'chosen'+'rejected' (preference), 'chosen'+'rejected' (hh), "
        "'instruction'+'output'|'response' (instruction) or 'text'"
    )


def _field(row: dict, name: str, where: str, schema: str):
    value = row.get(name)
    if value is None:
        raise ValueError(f"{where}: schema {schema!r} needs field {name!r}, which is missing")
    return value


def _string(row: dict, name: str, where: str, schema: str) -> str:
    value = _field(row, name, where, schema)
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} should be a string, got {type(value).__name__}")
    return value


def _messages(value, where: str, name: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: field {name!r} should be a non-empty list of {{role, content}}")
    for j, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: {name}[{j}] should be {{role: one of {ROLES}, content: str}}, got {message!r}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def parse_hh(transcript: str, where: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b ...' -> [{user, a}, {assistant, b}, ...]."""
    parts = HH_TURN.split(transcript)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError(f"{where}: an hh transcript should start with '\\n\\nHuman:', got {transcript[:40]!r}")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def sft_messages(row: dict, schema: str, where: str) -> list[dict] | str:
    """One row -> a chat (list of messages), or the raw string for the text schema."""
    if schema == "chat":
        return _messages(_field(row, "messages", where, schema), where, "messages")
    if schema == "instruction":
        instruction = _string(row, "instruction", where, schema)
        has_response_only = row.get("output") is None and row.get("response") is not None
        answer = _string(row, "response" if has_response_only else "output", where, schema)
        extra = row.get("input") or ""
        user = f"{instruction}\n\n{extra}" if extra else instruction  # Alpaca's join
        return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if schema == "text":
        return _string(row, "text", where, schema)
    if schema == "hh":  # the chosen transcript is a whole chat
        return parse_hh(_string(row, "chosen", where, schema), where)
    prompt, chosen, _ = preference_messages(row, schema, where)
    return prompt + chosen


def _turns(row: dict, name: str, where: str, role: str) -> list[dict]:
    """A string is one message of `role`; a list is a list of messages."""
    value = _field(row, name, where, "preference")
    return [{"role": role, "content": value}] if isinstance(value, str) else _messages(value, where, name)


class UnpairedRow(ValueError):
    """A conversation pair whose transcripts part before their last turn: no shared prompt."""


def preference_messages(row: dict, schema: str, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """One row -> (prompt messages, chosen response messages, rejected response messages)."""
    if schema == "hh":
        chosen = parse_hh(_string(row, "chosen", where, schema), where)
        rejected = parse_hh(_string(row, "rejected", where, schema), where)
    elif schema == "preference":
        chosen, rejected = _turns(row, "chosen", where, "assistant"), _turns(row, "rejected", where, "assistant")
        if len(chosen) == 1 and len(rejected) == 1:  # responses only: the prompt is its own column
            return _turns(row, "prompt", where, "user"), chosen, rejected
    else:
        raise ValueError(f"{where}: schema {schema!r} has no chosen/rejected pair; use 'preference' or 'hh' data")
    # Whole conversations (UltraFeedback, hh): prompt = all but the last turn, as the handbook does.
    if chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise UnpairedRow(f"{where}: 'chosen' and 'rejected' should share every turn but a last assistant turn")
    return chosen[:-1], chosen[-1:], rejected[-1:]


# ---------------------------------------------------------------------------------------------
# Tokenisation


class Sample(NamedTuple):
    ids: np.ndarray  # (t,) int64
    mask: np.ndarray  # (t,) bool: token is trained


class Pair(NamedTuple):
    prompt: np.ndarray  # (p,) int64
    chosen: np.ndarray  # (c,) int64 response tokens
    rejected: np.ndarray  # (r,) int64 response tokens


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)


def _encode_pieces(tokenizer, text: str, cuts: list[int]) -> Sample:
    """Encode text[cuts[i]:cuts[i+1]] one piece at a time; odd pieces (the spans) are masked in."""
    ids, mask = [], []
    bounds = [0, *cuts, len(text)]
    for i in range(len(bounds) - 1):
        piece = tokenizer.encode(text[bounds[i] : bounds[i + 1]]) if bounds[i] < bounds[i + 1] else []
        ids += piece
        mask += [i % 2 == 1] * len(piece)
    return Sample(np.array(ids, dtype=np.int64), np.array(mask, dtype=bool))


def _trained_everywhere(ids: list[int]) -> Sample:
    return Sample(np.array(ids, dtype=np.int64), np.ones(len(ids), dtype=bool))


def encode_chat(tokenizer, messages: list[dict], assistant_only: bool = True) -> Sample:
    """Render with the chat template; mask = assistant tokens (all tokens if not assistant_only)."""
    text = _render(tokenizer, messages)
    if not assistant_only:
        return _trained_everywhere(tokenizer.encode(text))
    cuts = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            head, turn = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1])
            if not (text.startswith(turn) and turn.startswith(head)):
                raise ValueError("the chat template does not render a conversation prefix by prefix; cannot find assistant spans")
            cuts += [len(head), len(turn)]
    return _encode_pieces(tokenizer, text, cuts)


def encode_sft(tokenizer, rows, schema: str, source: str, assistant_only: bool = True) -> list[Sample]:
    """Every row -> Sample; plain text is trained everywhere."""
    samples = []
    for i, row in enumerate(rows):
        chat = sft_messages(row, schema, f"{source} row {i}")
        if isinstance(chat, str):
            samples.append(_trained_everywhere(tokenizer.encode(chat)))
        else:
            samples.append(encode_chat(tokenizer, chat, assistant_only))
    return samples


def encode_pair(tokenizer, prompt: list[dict], chosen: list[dict], rejected: list[dict], max_length: int, max_prompt_length: int) -> Pair:
    """Tokenise a preference pair and truncate it as TRL 0.8.6's DPOTrainer (keep_end) does."""
    head = _render(tokenizer, prompt, True)
    responses = []
    for response in (chosen, rejected):
        full = _render(tokenizer, prompt + response)
        if not full.startswith(head):
            raise ValueError("the chat template does not render the prompt as a prefix of prompt + response")
        responses.append(tokenizer.encode(full[len(head) :]))
    prompt_ids = tokenizer.encode(head)
    longer = max(len(r) for r in responses)
    if len(prompt_ids) + longer > max_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    if len(prompt_ids) + longer > max_length:
        responses = [r[: max_length - max_prompt_length] for r in responses]
    return Pair(*(np.array(x, dtype=np.int64) for x in (prompt_ids, *responses)))


def load_sft(source: str, tokenizer, schema: str | None = None, assistant_only: bool = True, split: str = "train") -> list[Sample]:
    """A file or hub dataset of any schema -> one Sample per row, for PackedBatches."""
    rows, schema = load_rows(source, schema, split)
    return encode_sft(tokenizer, rows, schema, source, assistant_only)


def load_pairs(source: str, tokenizer, max_length: int, max_prompt_length: int, schema: str | None = None, split: str = "train") -> list[Pair]:
    """A preference or hh file or hub dataset -> one truncated Pair per row, for PairBatches."""
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be smaller than max_length ({max_length})")
    rows, schema = load_rows(source, schema, split)
    pairs, unpaired = [], []
    for i, row in enumerate(rows):
        try:
            messages = preference_messages(row, schema, f"{source} row {i}")
        except UnpairedRow as e:  # real data has a few (hh-rlhf helpful-base test: 9 of 2354)
            unpaired.append(e)
            continue
        pairs.append(encode_pair(tokenizer, *messages, max_length, max_prompt_length))
    if unpaired and not pairs:
        raise unpaired[0]
    if unpaired:
        print(f"{source}: skipped {len(unpaired)} of {len(rows)} rows with no shared prompt, "
              f"first: {unpaired[0]}", file=sys.stderr)
    return pairs


def pack(samples: list[Sample], seq_len: int, eos_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples joined with EOS, cut into overlapping windows -> input_ids, targets, loss_mask (n l)."""
    ids = np.concatenate([x for s in samples for x in (s.ids, [eos_id])]).astype(np.int64)
    mask = np.concatenate([x for s in samples for x in (s.mask, s.mask[-1:] if len(s.mask) else [False])]).astype(bool)
    n = (len(ids) - 1) // seq_len
    return ids[: n * seq_len].reshape(n, seq_len), ids[1 : n * seq_len + 1].reshape(n, seq_len), mask[1 : n * seq_len + 1].reshape(n, seq_len)


# ---------------------------------------------------------------------------------------------
# Batches: shuffle by (seed, epoch), shard by rank, resume from {"epoch", "index"}


class Batches:
    """Endless per-rank batches over epochs; subclasses say what a row is (`_layout`, `_collate`)."""

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int, world_size: int):
        if num_items == 0:
            raise ValueError("no training rows: the data set is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.index = 0, 0
        self._rows, self._rows_epoch = None, None

    def _epoch_rows(self):
        """This epoch's rows, laid out from a permutation seeded by (seed, epoch); cached."""
        if self._rows_epoch != self.epoch:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
            self._rows, self._rows_epoch = self._layout(order), self.epoch
            if len(self._rows) < self.batch_size * self.world_size:
                raise ValueError(f"the data gives {len(self._rows)} rows, fewer than one global batch of {self.batch_size} x {self.world_size}")
        return self._rows

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        step = self.batch_size * self.world_size
        if self.index + step > len(self._epoch_rows()):
            self.epoch, self.index = self.epoch + 1, 0
        start = self.index + self.rank * self.batch_size
        self.index += step
        return self._collate(self._epoch_rows()[start : start + self.batch_size])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class PackedBatches(Batches):
    """SFT windows: {input_ids, targets, loss_mask}, each (batch_size, seq_len)."""

    def __init__(self, samples: list[Sample], seq_len: int, batch_size: int, eos_id: int, seed: int, rank: int = 0, world_size: int = 1):
        super().__init__(len(samples), batch_size, seed, rank, world_size)
        self.samples, self.seq_len, self.eos_id = samples, seq_len, eos_id

    def _layout(self, order: np.ndarray) -> np.ndarray:
        """(n, 3, l): input_ids, targets, loss_mask of each window."""
        return np.stack(pack([self.samples[i] for i in order], self.seq_len, self.eos_id), axis=1)

    def _collate(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        rows = torch.from_numpy(rows)
        return {"input_ids": rows[:, 0], "targets": rows[:, 1], "loss_mask": rows[:, 2].bool()}


class PairBatches(Batches):
    """DPO pairs: {chosen,rejected}_{input_ids,targets,loss_mask} (b l), right padded with pad_id.

    Both halves share l = longest prompt + response in the batch - 1 (the last token predicts
    nothing), so the trainer may run them as one (2b l) forward as TRL does.
    """

    def __init__(self, pairs: list[Pair], batch_size: int, pad_id: int, seed: int, rank: int = 0, world_size: int = 1):
        super().__init__(len(pairs), batch_size, seed, rank, world_size)
        self.pairs, self.pad_id = pairs, pad_id

    def _layout(self, order: np.ndarray) -> list[Pair]:
        return [self.pairs[i] for i in order]

    def _collate(self, pairs: list[Pair]) -> dict[str, torch.Tensor]:
        length = max(len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in pairs)
        batch = {}
        for name in ("chosen", "rejected"):
            ids = torch.full((len(pairs), length), self.pad_id, dtype=torch.long)
            is_response = torch.zeros(len(pairs), length, dtype=torch.bool)
            for row, pair in enumerate(pairs):
                response = getattr(pair, name)
                p, r = len(pair.prompt), len(response)
                ids[row, :p] = torch.from_numpy(pair.prompt)
                ids[row, p : p + r] = torch.from_numpy(response)
                is_response[row, p : p + r] = True
            batch[f"{name}_input_ids"] = ids[:, :-1]
            batch[f"{name}_targets"] = ids[:, 1:]
            batch[f"{name}_loss_mask"] = is_response[:, 1:]
        return batch
