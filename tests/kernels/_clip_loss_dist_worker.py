"""Two-process gloo check of ClipLoss (run as a script by test_clip_loss.py).

For every (local_loss, gather_with_grad) mode each rank's ClipLoss value and the gradients of its
features and of logit_scale must equal open_clip's formula run on the same rank, with open_clip's
own gathers written out below. Exits non-zero (the failing assertion on stderr) when a check fails.
"""

import importlib
import os
import sys
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn
import torch.multiprocessing as mp
import torch.nn.functional as F

WORLD = 2
N_LOCAL, DIM = 7, 12


def open_clip_loss(image, text, scale, *, local_loss, gather_with_grad, rank, world_size):
    """open_clip's ClipLoss (src/open_clip/loss.py), its gather through torch.distributed.nn."""
    if gather_with_grad:
        all_image = torch.cat(torch.distributed.nn.all_gather(image), dim=0)
        all_text = torch.cat(torch.distributed.nn.all_gather(text), dim=0)
    else:
        gi = [torch.zeros_like(image) for _ in range(world_size)]
        gt = [torch.zeros_like(text) for _ in range(world_size)]
        dist.all_gather(gi, image)
        dist.all_gather(gt, text)
        if not local_loss:
            gi[rank], gt[rank] = image, text
        all_image, all_text = torch.cat(gi), torch.cat(gt)
    if local_loss:
        per_image = scale * image @ all_text.T
        per_text = scale * text @ all_image.T
    else:
        per_image = scale * all_image @ all_text.T
        per_text = per_image.T
    labels = torch.arange(per_image.shape[0])
    if local_loss:
        labels = labels + per_image.shape[0] * rank
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


def _worker(rank, init_file, backend):
    warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        kernels = importlib.import_module("unigen.kernels")
        importlib.import_module("unigen.kernels.contrastive_loss.launch")._BLOCK_OVERRIDE = (16, 16)
        g = torch.Generator().manual_seed(100 + rank)
        image = F.normalize(torch.randn(N_LOCAL, DIM, generator=g, dtype=torch.float64), dim=-1)
        text = F.normalize(torch.randn(N_LOCAL, DIM, generator=g, dtype=torch.float64), dim=-1)
        for local_loss in (False, True):
            for gather_with_grad in (False, True):
                mode = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank,
                            world_size=WORLD)
                results = []
                for fn in (lambda i, t, s: kernels.ClipLoss(**mode, backend=backend)(i, t, s),
                           lambda i, t, s: open_clip_loss(i, t, s, **mode)):
                    i, t = image.clone().requires_grad_(), text.clone().requires_grad_()
                    s = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
                    loss = fn(i, t, s)
                    results.append((loss.detach(), *torch.autograd.grad(loss, (i, t, s))))
                for name, a, b in zip(("loss", "image grad", "text grad", "scale grad"), *results):
                    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8,
                                               msg=lambda m, name=name: f"{mode} {name}: {m}")
        # mined negatives index the gathered batch and are never the pair itself
        loss, neg_t, neg_i = kernels.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank,
                                              world_size=WORLD, negatives="hardest",
                                              backend=backend)(image, text, torch.tensor(6.0, dtype=torch.float64))
        own = torch.arange(N_LOCAL) + rank * N_LOCAL
        assert neg_t.shape == (N_LOCAL,) and (neg_t != own).all() and (neg_i != own).all()
        assert ((neg_t >= 0) & (neg_t < WORLD * N_LOCAL)).all()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main():
    backend = sys.argv[1]
    os.environ.setdefault("TRITON_INTERPRET", "1")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "rendezvous"), backend), nprocs=WORLD, join=True)
    print(f"distributed ClipLoss OK ({backend})")


if __name__ == "__main__":
    main()
