"""Two-process gloo check of the mined [match] negatives (run as a script by
test_match_negatives_distributed.py; exits non-zero with the failing assertion on stderr).

Each rank holds its own batch of image-text pairs (uneven counts, shared pair ids, a rank whose
pairs are all positives of each other) and runs the tiny model's training forward:

- every pair with a non-positive pair on its rank gets exactly two negatives, the others none;
- the mined indices name a local non-positive pair;
- L_CL equals the one-process loss of the global batch (the ranks' pairs concatenated);
- the op gathers the features with every rank's pair count given from the host
  (``rank_sizes``), never reading the sizes back from the device itself.
"""

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
# pair ids per rank and per case: (rank 0, rank 1)
CASES = [
    ([0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7]),  # the 2 × 8 pairs
    ([0, 0, 1, 2, 3], [0, 1, 2]),  # uneven counts, two captions of one image on rank 0
    ([0, 0, 0], [0, 1, 2, 3, 4, 5]),  # rank 0: one image, three captions: no local candidate
    ([4], [0, 1]),  # one pair on rank 0
]


def tiny_model():
    from unigen.model.config import UniGenConfig
    from unigen.model.unigen_model import UniGen

    cfg = UniGenConfig.tiny()
    cfg.tasks.match_yes_ids, cfg.tasks.match_no_ids, cfg.tasks.eos_token_id = (5,), (6, 7), 2
    cfg.loss.same_text_positives = False
    cfg.__post_init__()
    torch.manual_seed(0)
    return UniGen(cfg).eval()  # eval: no dropout, so both ranks' encoders agree exactly


def pair_batch(ids, seed):
    """A batch of len(ids) pairs; pairs with one id share the image (a caption per pair)."""
    from unigen.model.batch import UniGenBatch

    g = torch.Generator().manual_seed(seed)
    images = sorted(set(ids))
    n = len(ids)
    lens = torch.randint(3, 12, (n,), generator=g)
    text = torch.randint(5, 500, (n, 12), generator=g)
    mask = torch.arange(12)[None, :] < lens[:, None]
    empty = torch.zeros(0, dtype=torch.long)
    return UniGenBatch(
        task=empty, image_index=empty, text_index=empty, target_ids=empty,
        target_cu_seqlens=torch.zeros(1, dtype=torch.int32),
        images=torch.randn(len(images), 3, 32, 32, generator=g), text_ids=text * mask,
        text_mask=mask, pair_image_index=torch.tensor([images.index(i) for i in ids]),
        pair_text_index=torch.arange(n), pair_ids=torch.tensor(ids))


def _worker(rank, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from unigen.kernels.contrastive_loss import contrastive_loss_reference
        from unigen.model import losses

        model = tiny_model()
        recorded = []
        original = losses.pair_contrastive

        def recording(*args, **kw):
            out = original(*args, **kw)
            recorded.append((args, out))
            return out

        losses_mod = sys.modules["unigen.model.unigen_model"]
        losses_mod.pair_contrastive = recording
        op_module = sys.modules["unigen.kernels.contrastive_loss.op"]  # contrastive_loss reads _gather there
        original_gather, gathers = op_module._gather, []

        def gather_recording(*args, **kw):
            gathers.append(args[4] if len(args) > 4 else kw.get("sizes"))
            return original_gather(*args, **kw)

        op_module._gather = gather_recording
        gen = torch.Generator().manual_seed(100 + rank)
        for case, per_rank in enumerate(CASES):
            ids = per_rank[rank]
            batch = pair_batch(ids, seed=10 * case + rank)
            recorded.clear()
            gathers.clear()
            out = model(batch, generator=gen)
            all_sizes = [len(p) for p in per_rank]
            assert gathers == [all_sizes], (case, rank, gathers)  # host-known sizes, one gather
            (img_f, txt_f, scale, pair_ids, *_), pairs = recorded[0]
            t = torch.tensor(ids)
            has_candidate = (t[:, None] != t[None, :]).any(1)
            expected = len(ids) + 2 * int(has_candidate.sum())
            assert out.num_samples["match"] == expected, (case, rank, out.num_samples, expected)
            for neg in (pairs.neg_text_for_image, pairs.neg_image_for_text):
                assert torch.equal(neg >= 0, has_candidate), (case, rank, neg)
                ok = neg >= 0
                assert bool((neg[ok] < len(ids)).all()), (case, rank, neg)
                assert bool((t[neg[ok]] != t[ok]).all()), (case, rank, neg)  # never a positive
            # L_CL over the global batch: gather every rank's features and ids
            sizes = [torch.zeros(1, dtype=torch.long) for _ in range(WORLD)]
            dist.all_gather(sizes, torch.tensor([len(ids)]))
            n_max = int(max(sizes))
            gathered = []
            for x in (img_f.detach(), txt_f.detach(), pair_ids + rank * (1 << 32)):
                pad = torch.zeros((n_max - x.shape[0],) + x.shape[1:], dtype=x.dtype)
                parts = [torch.zeros_like(torch.cat([x, pad])) for _ in range(WORLD)]
                dist.all_gather(parts, torch.cat([x, pad]))
                gathered.append(torch.cat([p[:int(k)] for p, k in zip(parts, sizes)]))
            ref = contrastive_loss_reference(gathered[0].double(), gathered[1].double(),
                                             scale.detach().double(), ids=gathered[2],
                                             negatives=None).loss
            # DDP averages the ranks' gradients: the ranks' mean loss is the global batch's
            mean = out.losses["cl"].double().reshape(1)
            dist.all_reduce(mean)
            torch.testing.assert_close(mean[0] / WORLD, ref, rtol=1e-5, atol=1e-6, msg=f"case {case}")
        print(f"rank {rank}: match negatives OK", flush=True)
        dist.barrier()  # neither rank tears gloo down while the other still reads from it
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(os.path.join(d, "init"),), nprocs=WORLD, join=True)
    print("distributed match negatives OK")
