"""Chunked KD loss (zebra.losses.kd_loss) vs the official full-logits KL: time and peak memory.

The peer is what the official trainer does (OFFICIAL.md section 5): both models' full (b, l, V)
logits in fp32, F.kl_div(log_softmax(student), softmax(teacher)), autograd through it.
Shapes default to SmolLM2-135M's head (d 576, V 49152) at seq 2048, bf16.

    python bench/kd_loss.py [--batch 4] [--seq 2048] [--chunk 256]
"""

import argparse
import time

import torch
import torch.nn.functional as F

from zebra.losses import kd_loss


def full_logits_kl(hs, ht, ws, wt):
    s, t = (hs @ ws.T).float(), (ht @ wt.T).float()
    return F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="sum") / (s.shape[0] * s.shape[1])


def measure(fn, hs, ws, repeats=5):
    for _ in range(2):  # warm-up
        fn().backward()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for _ in range(repeats):
        hs.grad = ws.grad = None
        fn().backward()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats * 1000, (torch.cuda.max_memory_allocated() - base) / 2**30


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--chunk", type=int, default=256)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    hs = torch.randn(args.batch, args.seq, args.hidden, device=dev, dtype=dt, requires_grad=True)
    ht = torch.randn(args.batch, args.seq, args.hidden, device=dev, dtype=dt)
    ws = (0.05 * torch.randn(args.vocab, args.hidden, device=dev, dtype=dt)).requires_grad_(True)
    wt = 0.05 * torch.randn(args.vocab, args.hidden, device=dev, dtype=dt)
    targets = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev)
    ours = lambda: kd_loss(hs, ht, ws, wt, targets, chunk_size=args.chunk).loss  # noqa: E731
    peer = lambda: full_logits_kl(hs, ht, ws, wt)  # noqa: E731
    with torch.no_grad():
        loss_ours, loss_peer = ours().item(), peer().item()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  b={args.batch} l={args.seq} d={args.hidden} V={args.vocab} bf16 chunk={args.chunk}")
    print(f"loss ours {loss_ours:.7f}  peer {loss_peer:.7f}")
    (ms_ours, gb_ours), (ms_peer, gb_peer) = measure(ours, hs, ws), measure(peer, hs, ws)
    print(f"fwd+bwd  ours {ms_ours:8.2f} ms  {gb_ours:6.2f} GiB peak extra")
    print(f"fwd+bwd  peer {ms_peer:8.2f} ms  {gb_peer:6.2f} GiB peak extra")
    print(f"ratio (peer / ours): time {ms_peer / ms_ours:.2f}x, memory {gb_peer / gb_ours:.2f}x")


if __name__ == "__main__":
    main()
