"""Two-process gloo check of ``patch_hf_model`` under DeepSpeed ZeRO-3 on CPU (run as a script by
test_sharded_heads.py when deepspeed is installed): the head's weight is partitioned across the
ranks and gathered by DeepSpeed's module hooks around the head's forward, where the patch reads
it. Each rank its own batch; the loss and every gathered gradient equal those of the unsharded
model (the mean over the ranks). Exits non-zero on a failed check.
"""

import copy
import os
import sys

import torch
import torch.distributed as dist
from _hf_sharded_worker import WORLD, spawn
from _hf_sharded_worker import _batch as _batch
from _hf_sharded_worker import _llama as _model


def _worker(rank, init_file):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        import deepspeed
        from deepspeed.utils import safe_get_full_grad

        from unigen.kernels import patch_hf_model

        deepspeed.init_distributed(dist_backend="gloo")
        batches = [_batch(10 + r) for r in range(WORLD)]
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                  "zero_allow_untested_optimizer": True}
        for tied in (False, True):
            base = _model(tied)
            losses, ref = [], {}
            for ids, labels in batches:
                m = copy.deepcopy(base)
                out = m(input_ids=ids, labels=labels)
                out.loss.backward()
                losses.append(out.loss.detach())
                for n, p in m.named_parameters():
                    ref[n] = ref.get(n, 0) + p.grad / WORLD
            model = patch_hf_model(copy.deepcopy(base))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
            out = engine(input_ids=batches[rank][0], labels=batches[rank][1])
            assert out.logits is None
            torch.testing.assert_close(out.loss.detach(), losses[rank], rtol=1e-5, atol=1e-6)
            engine.backward(out.loss)
            for n, p in engine.module.named_parameters():
                grad = safe_get_full_grad(p)
                torch.testing.assert_close(grad, ref[n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
            engine.step()
            if rank == 0:
                print(f"ZeRO-3 tied={tied}: OK", flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main():
    spawn(_worker)
    print("ZeRO-3 patch_hf_model OK")


if __name__ == "__main__":
    sys.exit(main())
