"""``transformers.Trainer`` (and TRL's ``SFTTrainer``) with FSDP2 through accelerate, 2 gloo
processes on CPU, run under torchrun by test_hf_trainer_fsdp.py: the same tiny Llama trained
unpatched and patched from the same seeds; rank 0 prints both runs' logged losses as JSON
(``LOSSES {...}``), which the test compares. Usage: ``torchrun --nproc_per_node 2
_hf_trainer_worker.py trainer|sft OUTPUT_DIR``.
"""

import copy
import json
import os
import sys

import torch

VOCAB = 301


def _model():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def _samples():
    g = torch.Generator().manual_seed(5)
    items = []
    for i in range(16):
        ids = torch.randint(3, VOCAB, (12,), generator=g)
        labels = ids.clone()
        labels[: 2 + i % 5] = -100  # a different number of loss tokens per sample
        items.append({"input_ids": ids, "labels": labels})
    return items


def _args(cls, out, **extra):
    return cls(output_dir=out, max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
               learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
               data_seed=0, dataloader_num_workers=0, disable_tqdm=True, fsdp="full_shard",
               fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}, **extra)


def _fsdp_on_cpu(trainer):
    """accelerate (1.16) turns FSDP on for accelerator devices only and leaves a CPU run on DDP:
    switch its state to FSDP with the Trainer's own plugin, so that ``prepare`` shards the model
    with FSDP2 (``fully_shard`` per decoder layer, then the root) over gloo, as it does on GPUs."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
        state.distributed_type = DistributedType.FSDP
        trainer.is_fsdp_enabled = True
    return trainer


def _train_trainer(model, out):
    from transformers import Trainer, TrainingArguments

    class Samples(torch.utils.data.Dataset):
        items = _samples()

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    trainer = _fsdp_on_cpu(Trainer(model=model, args=_args(TrainingArguments, out), train_dataset=Samples()))
    trainer.train()
    return trainer


def _tiny_tokenizer():
    """A word-level tokenizer over the tiny vocabulary (nothing downloads)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="t0", bos_token="t1", eos_token="t2")


def _train_sft(model, out):
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from trl import SFTConfig, SFTTrainer

    rows = _samples()
    # tokenised rows, as SFTTrainer's own preparation leaves them; the fingerprint is given, so
    # nothing is hashed (datasets' dill hashing fails on pyarrow's MonthDayNano type here)
    table = pa.table({"input_ids": [r["input_ids"].tolist() for r in rows],
                      "completion_mask": [(r["labels"] != -100).long().tolist() for r in rows]})
    data = Dataset(InMemoryTable(table), fingerprint="tiny-sft-rows")
    args = _args(SFTConfig, out, completion_only_loss=True, max_length=None, packing=False,
                 dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False)

    class Collator:  # input ids and the completion's labels, padded (all samples are one length)
        def __call__(self, batch):
            ids = torch.tensor([b["input_ids"] for b in batch])
            mask = torch.tensor([b["completion_mask"] for b in batch])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": torch.where(mask.bool(), ids, -100)}

    trainer = _fsdp_on_cpu(SFTTrainer(model=model, args=args, train_dataset=data, data_collator=Collator(),
                                      processing_class=_tiny_tokenizer()))
    trainer.train()
    return trainer


def main():
    mode, out = sys.argv[1], sys.argv[2]
    from unigen.kernels import patch_hf_model
    from unigen.kernels.dropin.hf_patch import is_hf_model_patched

    train = {"trainer": _train_trainer, "sft": _train_sft}[mode]
    base = _model()
    losses = {}
    for name in ("plain", "fused"):
        model = copy.deepcopy(base)
        if name == "fused":
            patch_hf_model(model)
        trainer = train(model, os.path.join(out, name))
        losses[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        if name == "fused":
            assert is_hf_model_patched(trainer.model) or is_hf_model_patched(model), "the Trainer dropped our forward"
            wrapped = type(trainer.model_wrapped).__name__
            assert "FSDP" in wrapped, wrapped  # FSDP2's dynamic subclass
    if int(os.environ.get("RANK", "0")) == 0:
        print("LOSSES " + json.dumps(losses), flush=True)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    from _hf_sharded_worker import exit_after_success

    exit_after_success()


if __name__ == "__main__":
    main()
