"""Two-process gloo check of the vocabulary-parallel fused cross-entropy (run as a script by
test_fused_linear_cross_entropy_sharded.py).

Every rank holds the same rows and targets and one slice of an odd vocabulary (151 and 150
rows of W); the loss, the statistics and every gradient (this rank's rows of dW and db, the whole
dH) must equal the unsharded op's on one process, for label smoothing, z-loss, soft-cap, ignored
rows, token weights (with and without a gradient) and every reduction, through
``process_group=`` with plain tensors and through DTensors (``Shard(0)`` weight, replicated
hidden). Exits non-zero (the failing assertion on stderr) when a check fails.
"""

import importlib
import itertools
import sys

import torch
import torch.distributed as dist
from _hf_sharded_worker import WORLD, spawn

N, D, V = 37, 20, 301


def _data(dtype):
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, D, generator=g, dtype=torch.float64) * 0.6).to(dtype)
    bias = torch.randn(V, generator=g, dtype=torch.float64).to(dtype)
    target = torch.randint(0, V, (N,), generator=g)
    target[::5] = -100
    target[3] = 150  # the last class of rank 0's slice
    target[4] = 151  # the first of rank 1's
    weights = torch.rand(N, generator=g, dtype=torch.float64).to(dtype)
    return hidden, weight, bias, target, weights


def _slice(rank):
    chunk = -(-V // WORLD)
    return slice(rank * chunk, min(V, (rank + 1) * chunk))


def _run(fn, hidden, weight, bias, target, weights, opts, weights_grad):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_() if bias is not None else None
    tw = None
    if weights is not None:
        tw = weights.clone().requires_grad_(weights_grad)
    loss, stats = fn(h, w, target, b, tw, opts)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    inputs = {k: x for k, x in zip(("h", "w", "b", "tw"), (h, w, b, tw)) if x is not None and x.requires_grad}
    grads = torch.autograd.grad(loss, list(inputs.values()), upstream)
    return loss.detach(), stats, dict(zip(inputs, grads))


def _check_op(rank, group, fl):
    rows = _slice(rank)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        hidden, weight, bias, target, weights = _data(dtype)
        grid = itertools.product((0.0, 0.1), (0.0, 1e-3), (None, 3.0), ("mean", "sum", "none"),
                                 (False, True), ("none", "plain", "grad"))
        for ls, zl, cap, reduction, with_bias, weighting in grid:
            if dtype == torch.float32 and (zl or weighting == "grad"):
                continue  # the fp64 pass covers these; keep the grid small
            opts = dict(label_smoothing=ls, z_loss=zl, softcap=cap, reduction=reduction, return_stats=True)
            tw = None if weighting == "none" else weights
            b = bias if with_bias else None

            def unsharded(h, w, t, b_, tw_, o):
                return fl.fused_linear_cross_entropy(h, w, t, b_, token_weights=tw_, backend="torch", **o)

            def sharded(h, w, t, b_, tw_, o):
                return fl.fused_linear_cross_entropy(h, w[rows], t, b_[rows] if b_ is not None else None,
                                                     token_weights=tw_, process_group=group, **o)

            ref = _run(unsharded, hidden, weight, b, target, tw, opts, weighting == "grad")
            out = _run(sharded, hidden, weight, b, target, tw, opts, weighting == "grad")
            what = f"dtype={dtype} ls={ls} zl={zl} cap={cap} {reduction} bias={with_bias} weights={weighting}"
            torch.testing.assert_close(out[0], ref[0], atol=tol, rtol=tol, msg=lambda m: f"loss {what}: {m}")
            torch.testing.assert_close(out[1].lse, ref[1].lse, atol=tol, rtol=tol)
            assert torch.equal(out[1].correct, ref[1].correct), what
            for key, g in ref[2].items():
                # (the sharded run took the gradient through w[rows]: this rank's rows of the
                # unsharded gradient, zeros elsewhere)
                got = out[2][key]
                if key in ("w", "b"):
                    assert not got[:rows.start].any() and not got[rows.stop:].any(), (key, rank, what)
                    got, g = got[rows], g[rows]
                torch.testing.assert_close(got, g, atol=tol, rtol=tol,
                                           msg=lambda m, k=key: f"grad {k} {what}: {m}")


def _check_dtensor(rank, fl):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
    hidden, weight, bias, target, _ = _data(torch.float64)
    for reduction in ("mean", "none"):
        h = hidden.clone().requires_grad_()
        w = distribute_tensor(weight.clone(), mesh, [Shard(0)]).requires_grad_()
        b = distribute_tensor(bias.clone(), mesh, [Shard(0)]).requires_grad_()
        loss = fl.fused_linear_cross_entropy(DTensor.from_local(h, mesh, [Replicate()]), w, target, b,
                                             label_smoothing=0.1, softcap=3.0, reduction=reduction)
        loss.sum().backward()
        h_ref, w_ref, b_ref = (x.clone().requires_grad_() for x in (hidden, weight, bias))
        ref = fl.fused_linear_cross_entropy(h_ref, w_ref, target, b_ref, label_smoothing=0.1, softcap=3.0,
                                            reduction=reduction, backend="torch")
        ref.sum().backward()
        assert type(loss) is torch.Tensor  # a plain loss, the same on every rank
        torch.testing.assert_close(loss, ref, atol=1e-10, rtol=1e-10)
        assert isinstance(w.grad, DTensor) and w.grad.placements == (Shard(0),)
        torch.testing.assert_close(w.grad.full_tensor(), w_ref.grad, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(b.grad.full_tensor(), b_ref.grad, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-10, rtol=1e-10)
    # a replicated DTensor weight is used locally; a plain hidden beside a vocabulary split and a
    # head split along D are refused with the reason
    w_rep = distribute_tensor(weight.clone(), mesh, [Replicate()])
    torch.testing.assert_close(fl.fused_linear_cross_entropy(hidden, w_rep, target),
                               fl.fused_linear_cross_entropy(hidden, weight, target))
    for w_bad, h_bad, message in (
        (distribute_tensor(weight.clone(), mesh, [Shard(0)]), hidden, "hidden is a plain tensor"),
        (distribute_tensor(weight.clone(), mesh, [Shard(1)]), hidden, "sharded along D"),
    ):
        try:
            fl.fused_linear_cross_entropy(h_bad, w_bad, target)
        except ValueError as exc:
            assert message in str(exc), exc
        else:
            raise AssertionError(f"no error for {message}")


def _worker(rank, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        fl = importlib.import_module("unigen.kernels.fused_linear_cross_entropy")

        _check_op(rank, dist.group.WORLD, fl)
        _check_dtensor(rank, fl)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main():
    spawn(_worker)
    print("vocabulary-parallel fused_linear_cross_entropy OK")


if __name__ == "__main__":
    sys.exit(main())
