"""How far is each MLA init from the teacher's attention before any training?

For every layer of the teacher, on real chat text (hh-rlhf transcripts in the teacher's chat
template), the relative output error of the MLA layer that replaces its attention:

    err = ||MLA(n) - Attn(n)|| / ||Attn(n)||,   n = the layer's normed input on the teacher's own run

for the init modes official, preserve (highest-frequency pairs, weight-space fits), preserve with
its fits whitened by separate calibration text, and the same with the pairs chosen by MHA2MLA's
norm criterion, at several kv ranks with d_rope 32 and a full-rank query,
then the layer means for a full-rank and an r_q = 400 query.

    OMP_NUM_THREADS=1 python bench/mla_init_error.py [--model smollm2-135m-instruct] [--tokens 2048]

(On a shared CPU, one OpenMP thread runs the many small SVDs tens of times faster than several.)
"""

import argparse
import sys

import torch

from zebra.data import load_sft, pack
from zebra.hub import load_llama
from zebra.init import mla_from_llama

DATA = "data/hh_rlhf/helpful-base_test.chat500.jsonl.gz"
# (column, mode, rope pairs, calibrated): calibrated inits whiten their fits by separate text
MODES = [("off", "official", "high_freq", False), ("pw", "preserve", "high_freq", False),
         ("pc", "preserve", "high_freq", True), ("pn", "preserve", "norm", True)]


@torch.no_grad()
def layer_inputs(model, ids):
    """Per layer: (normed attention input (n D), attention output (n D)) on the teacher's run."""
    seen = []
    model.model(ids, hidden_states=seen)
    return [(layer.input_layernorm(x).flatten(0, 1), attn.flatten(0, 1))
            for layer, (x, _, attn) in zip(model.model.layers, seen)]


@torch.no_grad()
def init_error(attn, cfg, inputs, target, calib, q_rank, kv_rank, mode, pairs, calibrated, seq_len):
    mla = mla_from_llama(attn, cfg, q_rank, kv_rank, 32, mode=mode, rope_pairs=pairs,
                         inputs=calib if calibrated else None)
    x = inputs.view(-1, seq_len, inputs.shape[-1])
    pos = torch.arange(seq_len, device=x.device).expand(x.shape[0], -1)
    out = mla(x, pos).flatten(0, 1)
    return ((out - target).norm() / target.norm()).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=2048, help="evaluation tokens (and as many for calibration)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--kv-ranks", default="16,32,64,128")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_llama(args.model, device=device)
    cfg = model.config
    windows = torch.from_numpy(pack(load_sft(DATA, tok, schema="hh"), args.seq_len, tok.eos_token_id)[0])
    n = args.tokens // args.seq_len
    if len(windows) < 2 * n:
        raise ValueError(f"{DATA} gives {len(windows)} windows of {args.seq_len} tokens, need {2 * n}")
    evals, calibs = layer_inputs(model, windows[:n].to(device)), layer_inputs(model, windows[n:2 * n].to(device))
    kv_ranks = [int(r) for r in args.kv_ranks.split(",")]
    settings = [(q, r, m) for q in (0, 400) for m in MODES for r in kv_ranks]
    errors = {}  # (layer, q_rank, kv_rank, mode name) -> err
    for i, layer in enumerate(model.model.layers):
        (inputs, target), (calib, _) = evals[i], calibs[i]
        for q_rank, kv_rank, (name, mode, pairs, calibrated) in settings:
            errors[i, q_rank, kv_rank, name] = init_error(layer.self_attn, cfg, inputs, target, calib, q_rank,
                                                          kv_rank, mode, pairs, calibrated, args.seq_len)
        print(f"layer {i} done", file=sys.stderr, flush=True)
    print(f"teacher {args.model}: H {cfg.num_attention_heads}, Hk {cfg.num_key_value_heads}, d {cfg.head_dim}; "
          f"{n * args.seq_len} tokens of hh-rlhf; d_rope 32, d_nope {cfg.head_dim - 32}; rel. output error")
    names = [m[0] for m in MODES]
    print("columns init@r_kv: off = official (OFFICIAL.md section 2); pw = preserve, weight-space fits; "
          "pc = preserve whitened by calibration text; pn = pc with MHA2MLA norm-chosen pairs")
    header = " ".join(f"{f'{m}@{r}':>7}" for m in names for r in kv_ranks)
    print(f"\nr_q = full, per layer\n{'layer':>5} {header}")
    for i in range(cfg.num_hidden_layers):
        print(f"{i:>5} " + " ".join(f"{errors[i, 0, r, m]:>7.3f}" for m in names for r in kv_ranks))
    for q_rank in (0, 400):
        mean = [sum(errors[i, q_rank, r, m] for i in range(cfg.num_hidden_layers)) / cfg.num_hidden_layers
                for m in names for r in kv_ranks]
        print(f"{'mean':>5} " + " ".join(f"{e:>7.3f}" for e in mean) + f"   (r_q = {q_rank or 'full'})")


if __name__ == "__main__":
    main()
