"""Showcase of the fused linear + vocabulary cross-entropy on a tiny LM head.

Trains the same small language-model head twice from the same initialisation — once with the
naive ``F.cross_entropy(F.linear(h, W), y)`` and once with ``fused_linear_cross_entropy`` — and
prints the loss of every step and the peak extra memory of one training step of each.

    python -m unigen.demo.fused_loss [--steps 8] [--tokens 8192] [--vocab 16384] [--dim 256]
"""

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F

from unigen.kernels import fused_linear_cross_entropy
from unigen.kernels.common.backend import resolve_backend
from unigen.memory import PeakMemory


class TinyHead(torch.nn.Module):
    def __init__(self, dim, vocab):
        super().__init__()
        self.mix = torch.nn.Linear(dim, dim)
        self.out = torch.nn.Parameter(torch.randn(vocab, dim) / dim ** 0.5)

    def hidden(self, x):
        return torch.nn.functional.gelu(self.mix(x))


def train(loss_name, args, device, data):
    torch.manual_seed(0)
    model = TinyHead(args.dim, args.vocab).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = data
    losses, peak = [], float("nan")
    start = time.perf_counter()
    for step in range(args.steps):
        # step 1 is measured: a steady-state step (optimizer state exists by then)
        with PeakMemory(device) if step == 1 else contextlib.nullcontext() as mem:
            h = model.hidden(x)
            if loss_name == "naive":
                loss = F.cross_entropy(F.linear(h, model.out), y)
            else:
                loss = fused_linear_cross_entropy(h, model.out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if step == 1:
            peak = mem.extra_mb
        losses.append(loss.item())
    return losses, peak, time.perf_counter() - start


def main(argv=None):
    from unigen.version import add_version_argument

    parser = argparse.ArgumentParser(prog="python -m unigen.demo.fused_loss", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_argument(parser, parser.prog)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=256)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(1)
    # A learnable toy task: the target is a fixed function of the input's argmax feature.
    x = torch.randn(args.tokens, args.dim, generator=g)
    y = (x.argmax(dim=1) * 7919) % args.vocab
    data = (x.to(device), y.to(device))
    backend = resolve_backend("auto", device, op="fused_linear_cross_entropy")
    if backend == "cpp":  # "auto" takes the PyTorch row blocks for reduction="mean" on CPU
        backend = "torch (row blocks; auto's choice for mean/sum on CPU)"
    print(f"tiny LM head: N={args.tokens} tokens, D={args.dim}, V={args.vocab}, device={device}, "
          f"fused backend={backend}")
    results = {name: train(name, args, device, data) for name in ("naive", "fused")}
    print(f"{'step':>4} {'naive loss':>11} {'fused loss':>11}")
    for i in range(args.steps):
        print(f"{i:>4} {results['naive'][0][i]:>11.5f} {results['fused'][0][i]:>11.5f}")
    for name, (_, peak, seconds) in results.items():
        print(f"{name:>6}: peak extra memory of one step {peak:8.1f} MiB, {args.steps} steps in {seconds:.2f} s")
    n_peak, f_peak = results["naive"][1], results["fused"][1]
    if f_peak > 0:
        print(f"fused uses {n_peak / f_peak:.1f}x less peak memory than naive "
              f"(naive materialises the {args.tokens}x{args.vocab} logits and their gradient)")
    drift = max(abs(a - b) for a, b in zip(results["naive"][0], results["fused"][0]))
    print(f"largest loss difference between the two runs: {drift:.2e}")


if __name__ == "__main__":
    main()
