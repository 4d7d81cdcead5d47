"""Two-process gloo checks of ``patch_hf_model`` on sharded heads (run as a script by
test_sharded_heads.py): FSDP2 in every wrapping and tensor-parallel heads, each against the
one-process unsharded, unpatched model.

- FSDP2 (data parallel: each rank its own batch): the root only; every decoder layer; the head
  alone (torchtitan's layout); the final norm and the head as one group; tied embeddings;
  ``reshard_after_forward`` both ways; patched before and after ``fully_shard``. The loss is each
  rank's unsharded loss; every gradient (gathered) is the mean of the ranks' unsharded ones.
- tensor parallel (both ranks the same batch): ``ColwiseParallel`` on the head (the vocabulary
  split over the ranks, logits sharded or gathered), also with Gemma 2's soft-cap and Cohere's
  logit scale: the loss and every gradient equal the unsharded model's, and no rank forms logits.

Usage: ``python _hf_sharded_worker.py fsdp|tp``. Exits non-zero on a failed check.
"""

import copy
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
VOCAB = 301


def _llama(tied, seed=0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=64, tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model


def _family(name, seed=0):
    import transformers

    torch.manual_seed(seed)
    small = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False)
    if name == "gemma2":
        cfg = transformers.Gemma2Config(**small, head_dim=8, final_logit_softcapping=2.0)
    elif name == "cohere":
        cfg = transformers.CohereConfig(**small, logit_scale=0.5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    else:
        cfg = transformers.LlamaConfig(**small)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    return model


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    return ids, labels


def _grads(model, ids, labels):
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _reference(base, rank_batches):
    """The unsharded, unpatched model: each rank's loss and the mean of their gradients."""
    losses, grads = [], {}
    for ids, labels in rank_batches:
        model = copy.deepcopy(base)
        losses.append(_grads(model, ids, labels).loss.detach())
        for n, p in model.named_parameters():
            grads[n] = grads.get(n, 0) + p.grad / len(rank_batches)
    return losses, grads


def _fsdp_layouts():
    # (name, tied head, how to shard, reshard_after_forward, patch after fully_shard)
    def root(m, r):
        return [m]

    def layers(m, r):
        return list(m.model.layers) + [m]

    def head_alone(m, r):  # torchtitan's layout
        return list(m.model.layers) + [m.lm_head, m]

    def norm_and_head(m, r):
        return list(m.model.layers) + [[m.model.norm, m.lm_head], m]

    return [("root only", False, root, True, False),
            ("per layer", False, layers, True, False),
            ("per layer, head alone", False, head_alone, True, False),
            ("per layer, head alone, patched after", False, head_alone, True, True),
            ("per layer, head alone, no reshard", False, head_alone, False, False),
            ("per layer, norm+head group", False, norm_and_head, True, False),
            ("tied embeddings, per layer", True, layers, True, False),
            ("tied embeddings, root only, patched after", True, root, False, True)]


def check_fsdp(rank):
    from torch.distributed.fsdp import fully_shard

    from unigen.kernels import patch_hf_model

    batches = [_batch(10 + r) for r in range(WORLD)]
    for name, tied, units, reshard, after in _fsdp_layouts():
        base = _llama(tied)
        losses, ref_grads = _reference(base, batches)
        model = copy.deepcopy(base)
        if not after:
            patch_hf_model(model)
        for unit in units(model, rank):
            fully_shard(unit, reshard_after_forward=reshard)
        if after:
            patch_hf_model(model)
        for step in range(2):  # a second step: the state FSDP2 left after the first is fine too
            model.zero_grad(set_to_none=True)
            out = _grads(model, *batches[rank])
            assert out.logits is None, name
            torch.testing.assert_close(out.loss.detach(), losses[rank], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name}: loss {m}")
            for n, p in model.named_parameters():
                torch.testing.assert_close(_full(p.grad), ref_grads[n], rtol=1e-4, atol=1e-5,
                                           msg=lambda m, n=n: f"{name}: grad {n}: {m}")
        if rank == 0:
            print(f"FSDP2 {name}: OK", flush=True)


def check_tp(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from unigen.kernels import patch_hf_model

    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
    ids, labels = _batch(3)  # the same batch on both ranks, as tensor parallelism has it
    for family, output_layout in (("llama", Shard(-1)), ("llama", Replicate()), ("gemma2", Shard(-1)),
                                  ("cohere", Replicate())):
        base = _family(family)
        losses, ref_grads = _reference(base, [(ids, labels)])
        model = copy.deepcopy(base)
        head = model.get_output_embeddings()
        parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=output_layout)})
        patch_hf_model(model)
        seen = []
        hook = head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
        out = _grads(model, ids, labels)
        hook.remove()
        what = f"{family}, ColwiseParallel(output_layouts={output_layout})"
        assert out.logits is None and all(s[-1] <= WORLD for s in seen), (what, seen)  # no logits anywhere
        torch.testing.assert_close(out.loss.detach(), losses[0], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{what}: loss {m}")
        for n, p in model.named_parameters():
            torch.testing.assert_close(_full(p.grad), ref_grads[n], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, n=n: f"{what}: grad {n}: {m}")
        if rank == 0:
            print(f"TP {what}: OK", flush=True)


def _worker(rank, init_file, which):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        {"fsdp": check_fsdp, "tp": check_tp}[which](rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def exit_after_success():
    """End a rank that has done and checked all its work, skipping the interpreter's teardown.
    Gloo groups made by a device mesh, the Trainer or DeepSpeed keep their threads
    (pt_gloo_runloop, gloo_tcp_loop) past ``destroy_process_group``, and their C++ destructors
    at exit can abort the process ("terminate called without an active exception"): seen in
    full suite runs, after the results were out. A failed check raises before this is reached,
    so the rank still exits non-zero with its traceback."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _rank(rank, worker, *args):
    worker(rank, *args)
    exit_after_success()


def spawn(worker, *args):
    """``worker(rank, rendezvous_file, *args)`` on WORLD processes, one thread each."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(worker, os.path.join(tmp, "rendezvous"), *args), nprocs=WORLD,
                 join=True)


def main():
    which = sys.argv[1]
    spawn(_worker, which)
    print(f"sharded patch_hf_model OK ({which})")


if __name__ == "__main__":
    sys.exit(main())
