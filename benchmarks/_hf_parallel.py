"""Two-rank training steps of a transformers Llama for ``test_bench_hf_patch.py``: FSDP2 (data
parallel, the head sharded with each layer's unit and the root) and a vocabulary-parallel head
(``ColwiseParallel``: unpatched, each rank gathers the full logits for transformers' loss;
patched, the vocabulary-parallel fused loss). Rank 0 is the benchmark's own process; rank 1 is
this file run as a script, stepping in lockstep with it (every step's collectives pair the
two), and writing its mean step time and peak memory to a JSON file.

CPU (gloo) only: two ranks need two devices on a GPU machine.
"""

import json
import sys
import time

import torch
import torch.distributed as dist

CONFIG = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=32000, max_position_embeddings=512)
BATCH, SEQ = 2, 512
SETUPS = ("fsdp2", "vocab_parallel")


def init(store_path, rank):
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)


def build(setup, provider, rank):
    """(model, step): one forward + backward of this rank's batch."""
    import transformers

    from unigen.kernels import patch_hf_model

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG, bos_token_id=1, eos_token_id=2)).train()
    if setup == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        seed = 10 + rank  # data parallel: each rank its own batch
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (2,))
        parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})
        seed = 10  # tensor parallel: the same batch on both ranks
    if provider == "ours":
        patch_hf_model(model)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, CONFIG["vocab_size"], (BATCH, SEQ), generator=g)

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    return model, step


def peak_mb(step):
    from unigen.memory import PeakMemory

    with PeakMemory(torch.device("cpu")) as mem:
        step()
    return mem.extra_mb


def main():
    store_path, setup, provider, n_steps, out = sys.argv[1:6]
    torch.set_num_threads(1)
    init(store_path, 1)
    try:
        _, step = build(setup, provider, 1)
        step()  # warm-up, as rank 0
        peak = peak_mb(step)
        times = []
        for _ in range(int(n_steps)):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        with open(out, "w") as f:
            json.dump({"peak_mem_mb": peak, "mean_ms": 1e3 * sum(times) / len(times)}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
