"""Two-process gloo check of contrastive_loss (run as a script by test_contrastive_distributed.py).

Every rank holds its slice of one global batch; the distributed loss averaged over the ranks, the
gradients and the "hardest" negatives must equal the single-process reference on the whole batch.
Exits non-zero (with the failing assertion on stderr) when any check fails.
"""

import importlib
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
N_LOCAL, DIM = 13, 20


def _data():
    g = torch.Generator().manual_seed(1234)
    n = N_LOCAL * WORLD
    img = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    txt = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    ids = torch.arange(n) // 3  # groups of 3 positives, one straddles the rank boundary
    return img, txt, ids


def _worker(rank, init_file, backend):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        cl = importlib.import_module("unigen.kernels.contrastive_loss")
        importlib.import_module("unigen.kernels.contrastive_loss.launch")._BLOCK_OVERRIDE = (16, 16)
        img, txt, ids = _data()
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        for dtype, atol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
            scale = torch.tensor(4.0, dtype=dtype, requires_grad=True)
            img_l = img[rows].to(dtype).requires_grad_()
            txt_l = txt[rows].to(dtype).requires_grad_()
            for ids_arg, smoothing in ((None, 0.0), (ids, 0.1)):
                ids_l = None if ids_arg is None else ids_arg[rows]
                out = cl.contrastive_loss(img_l, txt_l, scale, ids=ids_l, label_smoothing=smoothing,
                                          negatives="hardest", backend=backend)
                g_img, g_txt, g_scale = torch.autograd.grad(out.loss, (img_l, txt_l, scale))

                # Reference: one process, the whole batch, fp64.
                i64, t64 = img.clone().requires_grad_(), txt.clone().requires_grad_()
                s64 = scale.detach().double().requires_grad_()
                ref = cl.contrastive_loss_reference(i64, t64, s64, ids=ids_arg,
                                                    label_smoothing=smoothing, negatives="hardest")
                r_img, r_txt, r_scale = torch.autograd.grad(ref.loss, (i64, t64, s64))
                loss_mean = out.loss.detach().double().clone()
                dist.all_reduce(loss_mean)
                loss_mean /= WORLD
                torch.testing.assert_close(loss_mean, ref.loss.detach(), atol=atol, rtol=0)
                # all_gather's backward sums every rank's gradient into the owner: the local
                # gradient is that of Σ_r loss_r = WORLD · (global loss), which DDP's averaging
                # turns into the exact gradient of the global loss.
                torch.testing.assert_close(g_img.double(), WORLD * r_img[rows], atol=atol, rtol=1e-6)
                torch.testing.assert_close(g_txt.double(), WORLD * r_txt[rows], atol=atol, rtol=1e-6)
                g_scale_mean = g_scale.detach().double().clone()
                dist.all_reduce(g_scale_mean)
                g_scale_mean /= WORLD
                torch.testing.assert_close(g_scale_mean, r_scale, atol=atol, rtol=1e-6)
                # Negatives index the global batch.
                assert out.neg_text_for_image.shape == (N_LOCAL,)
                assert torch.equal(out.neg_text_for_image, ref.neg_text_for_image[rows])
                assert torch.equal(out.neg_image_for_text, ref.neg_image_for_text[rows])
            # Sampled negatives: global indices, never a positive (ids shared across ranks).
            gen = torch.Generator().manual_seed(rank)
            out = cl.contrastive_loss(img_l, txt_l, scale, ids=ids[rows], generator=gen, backend=backend)
            for neg in (out.neg_text_for_image, out.neg_image_for_text):
                assert ((neg >= 0) & (neg < N_LOCAL * WORLD)).all()
                assert (ids[neg] != ids[rows]).all()
        _check_uneven_ranks(cl, rank, backend)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _check_uneven_ranks(cl, rank, backend):
    """Ranks holding different numbers of pairs, one of them none: the size-weighted sum of the
    local losses is the global loss, and its gradients are the global gradients; passing the
    sizes (``rank_sizes``, the step without a host sync) gives exactly the same result."""
    img, txt, ids = _data()
    n = img.shape[0]
    for split in (5, 0):  # rank 0 holds the first `split` pairs, rank 1 the rest
        rows = slice(0, split) if rank == 0 else slice(split, n)
        n_local = rows.stop - rows.start
        img_l, txt_l = img[rows].clone().requires_grad_(), txt[rows].clone().requires_grad_()
        scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
        out = cl.contrastive_loss(img_l, txt_l, scale, ids=ids[rows], negatives="hardest",
                                  backend=backend)
        weighted = out.loss * (n_local / n)
        g_img, g_txt = torch.autograd.grad(weighted, (img_l, txt_l), allow_unused=True)
        i64, t64 = img.clone().requires_grad_(), txt.clone().requires_grad_()
        ref = cl.contrastive_loss_reference(i64, t64, scale.detach(), ids=ids, negatives="hardest")
        r_img, r_txt = torch.autograd.grad(ref.loss, (i64, t64))
        total = weighted.detach().clone()
        dist.all_reduce(total)
        torch.testing.assert_close(total, ref.loss.detach(), atol=1e-10, rtol=0)
        if n_local:
            torch.testing.assert_close(g_img, r_img[rows], atol=1e-10, rtol=1e-6)
            torch.testing.assert_close(g_txt, r_txt[rows], atol=1e-10, rtol=1e-6)
            assert torch.equal(out.neg_text_for_image, ref.neg_text_for_image[rows])
            assert torch.equal(out.neg_image_for_text, ref.neg_image_for_text[rows])
        else:
            assert out.neg_text_for_image.numel() == 0 and out.loss.item() == 0.0
        # The caller's rank_sizes (no size gather, no host sync): exactly the same result,
        # with and without ids, mined and sampled negatives included.
        sizes = [split, n - split]
        for ids_arg, negatives in ((ids[rows], "hardest"), (None, "sample")):
            kw = dict(ids=ids_arg, negatives=negatives, backend=backend)
            a = cl.contrastive_loss(img_l, txt_l, scale, generator=torch.Generator().manual_seed(5), **kw)
            b = cl.contrastive_loss(img_l, txt_l, scale, generator=torch.Generator().manual_seed(5),
                                    rank_sizes=sizes, **kw)
            assert torch.equal(a.loss, b.loss)
            assert torch.equal(a.neg_text_for_image, b.neg_text_for_image)
            assert torch.equal(a.neg_image_for_text, b.neg_image_for_text)
            # every rank takes part in the backward's reduce-scatter, also one without pairs
            ga = torch.autograd.grad(a.loss, (img_l, txt_l, scale), allow_unused=True)
            gb = torch.autograd.grad(b.loss, (img_l, txt_l, scale), allow_unused=True)
            for x, y in zip(ga, gb):
                assert (x is None and y is None) or torch.equal(x, y)
        try:
            cl.contrastive_loss(img_l, txt_l, scale, rank_sizes=[n_local + 1] * 2, backend=backend)
        except ValueError as e:
            assert "rank_sizes" in str(e)
        else:
            raise AssertionError("a wrong rank_sizes entry for this rank was accepted")


def main():
    backend = sys.argv[1]
    os.environ.setdefault("TRITON_INTERPRET", "1")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "rendezvous"), backend), nprocs=WORLD, join=True)
    print(f"distributed contrastive_loss OK ({backend})")


if __name__ == "__main__":
    main()
