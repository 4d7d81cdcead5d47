"""Training checkpoints: atomic, every N steps and at the end, newest K kept, exact resume.

Layout of ``<output_dir>/checkpoints/step_<N>/``::

    model/            UniGen.from_pretrained-loadable: config.json, model.safetensors, tokenizers
    optimizer.pt      AdamW state (unsharded)
    trainer.pt        step, scheduler, loss history, resolved config, and per rank: the RNG
                      states (torch CPU/CUDA, python, numpy, the hard-negative generator) and
                      the data position (unigen.data.DataPosition)

With ``checkpoint.format: sharded`` the weights and the optimizer state are instead
``sharded/``, written by every rank through ``torch.distributed.checkpoint`` (each its own
shards, nothing gathered: FSDP2's way), and ``model/`` holds the config and tokenizers only.

A checkpoint is written into ``.tmp-step_<N>-<pid>`` and renamed to ``step_<N>`` only when
complete (a rename is atomic on POSIX file systems), so a crash mid-save leaves at most a
temporary folder, which the next save clears; readers only ever see complete checkpoints.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings

import numpy as np
import torch

from unigen.model.pretrained import (
    CONFIG_NAME,
    DECODER_TOKENIZER_DIR,
    TEXT_TOKENIZER_DIR,
    WEIGHTS_NAME,
    CheckpointError,
    check_state_dict,
    read_weights,
)

CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_FILE = "trainer.pt"
SHARDED_DIR = "sharded"
_NAME = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS)


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _NAME.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def latest_checkpoint(root: str) -> str | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def _fsync_tree(path: str) -> None:
    # Flush file contents before the rename publishes them: a power loss must not leave a
    # complete-looking checkpoint with empty files.
    for dirpath, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_pretrained(directory: str, config, state_dict: dict, text_tokenizer=None,
                     decoder_tokenizer=None) -> None:
    """What ``UniGen.save_pretrained`` writes, from a (gathered) state dict: also works when
    the live model is sharded by FSDP."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    config.save(os.path.join(directory, CONFIG_NAME))
    if state_dict is not None:  # None: a sharded checkpoint keeps its weights in sharded/
        sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        save_file(sd, os.path.join(directory, WEIGHTS_NAME),
                  metadata={"format": "pt", "model": "UniGen"})
    if text_tokenizer is not None:
        text_tokenizer.save_pretrained(os.path.join(directory, TEXT_TOKENIZER_DIR))
    if decoder_tokenizer is not None:
        decoder_tokenizer.save_pretrained(os.path.join(directory, DECODER_TOKENIZER_DIR))


def prepare_checkpoint_dir(root: str, step: int, tag: str | None = None) -> str:
    """The temporary folder ``root/step_<step>`` is written into (made empty; temporaries of
    saves that crashed are cleared). ``tag``: the same on every rank when all of them write
    into it (a sharded save), else this process's id. Call on rank 0 only."""
    os.makedirs(root, exist_ok=True)
    name = f"step_{step:08d}"
    for leftover in os.listdir(root):  # temporaries of saves that crashed
        if leftover.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, leftover), ignore_errors=True)
    tmp = os.path.join(root, f".tmp-{name}-{tag if tag is not None else os.getpid()}")
    os.makedirs(tmp)
    return tmp


def save_checkpoint(root: str, step: int, *, model_config, model_state: dict | None,
                    optimizer_state: dict | None, trainer_state: dict, keep_last: int,
                    text_tokenizer=None, decoder_tokenizer=None, tmp: str | None = None) -> str:
    """Write ``root/step_<step>`` atomically, then delete all but the newest ``keep_last``
    (0 keeps all). Returns the checkpoint path. Call on rank 0 only.

    ``model_state``/``optimizer_state`` None: a sharded checkpoint, whose ``sharded/`` the ranks
    have already written into ``tmp`` (from :func:`prepare_checkpoint_dir`)."""
    name = f"step_{step:08d}"
    final = os.path.join(root, name)
    if tmp is None:
        tmp = prepare_checkpoint_dir(root, step)
    try:
        write_pretrained(os.path.join(tmp, MODEL_DIR), model_config, model_state,
                         text_tokenizer, decoder_tokenizer)
        if optimizer_state is not None:
            torch.save(optimizer_state, os.path.join(tmp, OPTIMIZER_FILE))
        torch.save(trainer_state, os.path.join(tmp, TRAINER_FILE))
        _fsync_tree(tmp)
        if os.path.exists(final):  # the same step saved again (e.g. periodic, then at exit)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        for _, old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_trainer_state(path: str) -> dict:
    """A checkpoint's ``trainer.pt`` (step, schedule, history, resolved config, per-rank
    states), read before its weights: whether the checkpoint can be resumed at all is decided
    from it."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is not a directory")
    if not os.path.isfile(os.path.join(path, TRAINER_FILE)):
        raise CheckpointError(f"checkpoint {path!r} has no {TRAINER_FILE}: not a training "
                              f"checkpoint (or an incomplete one)")
    try:
        return torch.load(os.path.join(path, TRAINER_FILE), map_location="cpu",
                          weights_only=False)
    except Exception as e:  # truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {path!r}: {e}") from e


def load_checkpoint(path: str, model, trainer: dict | None = None) -> dict:
    """``{"model": state dict, "optimizer": ..., "trainer": ...}`` of a checkpoint folder, the
    model weights checked against ``model`` (keys and shapes) before anything is loaded.
    ``trainer``: its :func:`read_trainer_state`, when already read."""
    if trainer is None:
        trainer = read_trainer_state(path)
    sharded = os.path.join(path, SHARDED_DIR)
    if os.path.isdir(sharded):  # the ranks read their shards themselves
        return {"model": None, "optimizer": None, "trainer": trainer, "sharded": sharded}
    for need in (os.path.join(MODEL_DIR, WEIGHTS_NAME), OPTIMIZER_FILE):
        if not os.path.isfile(os.path.join(path, need)):
            raise CheckpointError(f"checkpoint {path!r} has no {need}: not a training checkpoint "
                                  f"(or an incomplete one)")
    weights = read_weights(os.path.join(path, MODEL_DIR, WEIGHTS_NAME))
    check_state_dict(model, weights, f"checkpoint {path!r}")
    try:
        optimizer = torch.load(os.path.join(path, OPTIMIZER_FILE), map_location="cpu",
                               weights_only=False)
    except Exception as e:  # truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {path!r}: {e}") from e
    return {"model": weights, "optimizer": optimizer, "trainer": trainer, "sharded": None}


def export_model(checkpoint: str, out_dir: str) -> str:
    """Write a checkpoint's model as a ``UniGen.from_pretrained`` folder ``out_dir`` (config,
    weights, tokenizers), from either format: a full checkpoint's ``model/`` is copied; a
    sharded one's weights are read from ``sharded/`` in this one process (no process group,
    whatever number of processes wrote them) — the way to start a run of another size from it
    (``--init.from_pretrained=out_dir``)."""
    from safetensors.torch import save_file

    model_dir = os.path.join(checkpoint, MODEL_DIR)
    if not os.path.isfile(os.path.join(model_dir, CONFIG_NAME)):
        raise CheckpointError(f"export: {checkpoint!r} is no training checkpoint (no "
                              f"{MODEL_DIR}/{CONFIG_NAME})")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"export: {out_dir!r} exists and is not empty")
    sharded = os.path.join(checkpoint, SHARDED_DIR)
    if not os.path.isdir(sharded):
        shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
        return out_dir
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)  # config and tokenizers
    tmp = os.path.join(out_dir, ".sharded-state.pt")
    try:
        with warnings.catch_warnings():
            # "torch.distributed is ... uninitialized, assuming ... a single process": just so
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp_to_torch_save(sharded, tmp)
        state = torch.load(tmp, map_location="cpu", weights_only=False)["model"]
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    save_file({k: v.detach().contiguous() for k, v in state.items()},
              os.path.join(out_dir, WEIGHTS_NAME), metadata={"format": "pt", "model": "UniGen"})
    return out_dir


# ---- random state ---------------------------------------------------------------------------
def capture_rng_state(device: torch.device, generator: torch.Generator | None) -> dict:
    """Every random source a training step draws from, on this rank."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng_state(state: dict, device: torch.device, generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
