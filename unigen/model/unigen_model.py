"""The UniGen model (paper §3): encoders, decoder, the five losses, loading, and inference.

Training (``UniGen.forward(batch)``), per batch:

1. every distinct image goes once through the frozen ViT and the Q-Former (E_v, and the image
   [CLS] = first query), every distinct text once through XLM-R (E_t, and the text [CLS]);
2. L_CL on the image-text pairs (cosine similarity / learnable τ), which also mines one hard
   negative text per image and one hard negative image per text (§3.3, after ALBEF);
3. the generative samples (trans, cap, qus from the batch; [match] built from the pairs: positives
   answer "yes", mined negatives "no") are packed back to back as
   ``prefix (E_v ⊕ E_t ⊕ task token) ⊕ target[:-1]`` and run through the decoder in one packed
   call (prefix-LM attention op, causal or bidirectional prefix);
4. the rows that predict target tokens go through one fused linear+cross-entropy call with
   per-task weights (see :mod:`unigen.model.losses`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.export import register_dataclass

from unigen.model.batch import TASK_IDS, UniGenBatch
from unigen.model.config import TASK_NAMES, UniGenConfig
from unigen.model.gpt2_decoder import GPT2Decoder
from unigen.model.image_encoder import ImageEncoder, preprocess_images
from unigen.model.losses import generative_losses, pair_contrastive
from unigen.model.text_encoder import TextEncoder


@dataclass
class UniGenOutput:
    """What the training forward returns.

    loss: the total objective (0-d, differentiable).
    losses: detached per-term values for logging: trans, cap, qus, match (each the mean over its
        own target tokens, 0 when absent) and cl.
    temperature: the current τ of L_CL (1 / logit scale).
    num_tokens: target tokens per task (and "total"); num_samples: decoder samples per task
        (mined [match] samples included); num_pairs: pairs in L_CL.
    """

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    temperature: torch.Tensor
    num_tokens: dict[str, int]
    num_samples: dict[str, int]
    num_pairs: int


# A pytree node: FSDP2 attaches its pre-backward hook (the all-gather that brings resharded
# parameters back, the tied LM head's among them) to the tensors it finds in a module's output,
# and torch < 2.13 finds them inside a dataclass only when it is registered.
register_dataclass(UniGenOutput)


@dataclass
class RetrievalResult:
    """Top-k of :meth:`UniGen.retrieve`: indices sorted best first, and their re-ranked scores
    (P([match] = yes)); the contrastive similarities of the same candidates alongside."""

    image_to_text: torch.Tensor
    image_to_text_scores: torch.Tensor
    image_to_text_similarity: torch.Tensor
    text_to_image: torch.Tensor
    text_to_image_scores: torch.Tensor
    text_to_image_similarity: torch.Tensor


def _merge_identical_texts(pair_ids: torch.Tensor, pair_texts: torch.Tensor) -> torch.Tensor:
    """Pair ids in which pairs of one image *or* of identical texts share an id: the connected
    components of both relations (each label becomes the smallest id of its component)."""
    texts, text_group = torch.unique(pair_texts, dim=0, return_inverse=True)
    images, image_group = torch.unique(pair_ids, return_inverse=True)
    n = pair_ids.numel()
    labels = image_group
    while True:  # min label over each text group, then over each image group, until stable
        merged = labels.new_full((texts.shape[0],), n).scatter_reduce(
            0, text_group, labels, "amin")[text_group]
        merged = labels.new_full((images.shape[0],), n).scatter_reduce(
            0, image_group, merged, "amin")[image_group]
        if torch.equal(merged, labels):
            return labels
        labels = merged


def _host_tensor(t: torch.Tensor) -> torch.Tensor:
    """A batch tensor on the host: itself for the loader's host copy, else a copy back (one
    device read: pass the host batch for a sync-free step)."""
    return t if t.device.type == "cpu" else t.cpu()


def _to_device(values, device) -> torch.Tensor:
    """Host values (numpy or a CPU tensor) on ``device`` without waiting for the copy."""
    t = torch.as_tensor(values)
    return t if t.device == torch.device(device) else t.to(device, non_blocking=True)


class _HostLayout:
    """The shapes of a batch's step, read from the host copy of its index tensors (numpy):
    text lengths, the packed rows of the texts' real tokens, each sample's decoder slot."""

    def __init__(self, batch: UniGenBatch, num_query_tokens: int, same_text_positives: bool):
        def ints(t):
            return _host_tensor(t).numpy().astype(np.int64)

        self.num_query_tokens = num_query_tokens
        self.same_text_positives = same_text_positives
        self.task = ints(batch.task)
        pair_ids = _host_tensor(batch.pair_ids).long()
        if pair_ids.numel() >= 2 and same_text_positives:
            pair_ids = _merge_identical_texts(
                pair_ids, _host_tensor(batch.text_ids)[_host_tensor(batch.pair_text_index).long()])
        self.pair_ids = pair_ids
        """The pair ids L_CL and the mining use (identical texts merged when configured)."""
        mask = (_host_tensor(batch.text_mask).numpy().astype(bool) if batch.text_mask is not None
                else np.zeros((0, 0), dtype=bool))
        self.text_lens = mask.sum(1).astype(np.int64)
        self.text_token_rows = np.flatnonzero(mask.reshape(-1)).astype(np.int64)
        self.pair_text_index = ints(batch.pair_text_index)
        self.target_lens = np.diff(ints(batch.target_cu_seqlens))
        image_index, text_index = ints(batch.image_index), ints(batch.text_index)
        second = (ints(batch.second_image_index) if batch.second_image_index is not None
                  else np.full_like(image_index, -1))
        lens = np.append(self.text_lens, 0)  # index -1 (no text) reads the appended 0
        n_txt = lens[np.where(text_index >= 0, text_index, lens.size - 1)]
        n_img = ((image_index >= 0).astype(np.int64) + (second >= 0)) * num_query_tokens
        # prefix (images, text, task token) + target[:-1]
        self.slot_lens = n_img + n_txt + self.target_lens


class UniGen(nn.Module):
    def __init__(self, config: UniGenConfig | None = None, *, text_tokenizer=None,
                 decoder_tokenizer=None):
        super().__init__()
        config = UniGenConfig.paper() if config is None else config
        if not isinstance(config, UniGenConfig):
            raise TypeError(f"UniGen: config must be a UniGenConfig, got {type(config).__name__}")
        self.config = copy.deepcopy(config)
        width = config.decoder.n_embd
        self.image_encoder = ImageEncoder(config.vision, config.qformer, width)
        self.text_encoder = TextEncoder(config.text, width)
        self._install_decoder(GPT2Decoder(copy.deepcopy(config.decoder)))
        # Projections of the two [CLS] tokens for L_CL (§3.3; BLIP-2's 256-d vision/text_proj).
        self.image_proj = nn.Linear(config.qformer.hidden_size, config.loss.contrastive_dim)
        self.text_proj = nn.Linear(config.text.hidden_size, config.loss.contrastive_dim)
        # Learnable temperature, stored as log(1/τ) like CLIP's logit_scale.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.loss.init_temperature)))
        self.text_tokenizer = None
        self.decoder_tokenizer = None
        if text_tokenizer is not None or decoder_tokenizer is not None:
            self.set_tokenizers(text_tokenizer, decoder_tokenizer)

    @classmethod
    def tiny(cls, tokenizers=None, **config_overrides) -> "UniGen":
        """A ``UniGenConfig.tiny()`` model (CPU, seconds). ``tokenizers``: a
        :class:`unigen.model.tokenizers.TinyTokenizers` (from ``train_tiny_tokenizers``); the
        vocabulary sizes follow it and the tokenizers are attached."""
        cfg = UniGenConfig.tiny(**config_overrides)
        if tokenizers is None:
            return cls(cfg)
        cfg.text.vocab_size = tokenizers.text_vocab_size
        cfg.decoder.vocab_size = tokenizers.decoder_vocab_size
        cfg.__post_init__()
        text_tok, dec_tok = tokenizers.load(cfg.tasks.task_tokens)
        return cls(cfg, text_tokenizer=text_tok, decoder_tokenizer=dec_tok)

    # ---- construction helpers ------------------------------------------------------------
    def _install_decoder(self, decoder: GPT2Decoder) -> None:
        if decoder.vocab_size != self.config.decoder.vocab_size:
            raise ValueError(f"UniGen: the decoder has {decoder.vocab_size} tokens, the config "
                             f"{self.config.decoder.vocab_size} (before the task tokens)")
        for f in ("n_positions", "n_embd", "n_layer", "n_head"):
            if getattr(decoder.config, f) != getattr(self.config.decoder, f):
                raise ValueError(f"UniGen: decoder.{f} = {getattr(decoder.config, f)} but the "
                                 f"config says {getattr(self.config.decoder, f)}")
        # The four task tokens [trans] [cap] [qus] [match] become rows V..V+3 of the decoder's
        # embedding and so of its tied LM head (§3.3).
        decoder.add_tokens(len(TASK_NAMES))
        decoder.freeze_configured_layers()  # the middle 6 of GPT-2 base's 12 blocks (§4.2)
        # One config object: switching model.config.decoder.attention_backend switches the
        # decoder's (the shapes were checked equal above or built from this very config).
        decoder.config = self.config.decoder
        self.decoder = decoder

    def configure_backends(self, *, cross_entropy: str | None = None, contrastive: str | None = None,
                           attention: str | None = None, kernels: str | None = None) -> None:
        """Switch implementations in place (weights untouched): ``cross_entropy`` and
        ``contrastive`` "fused"/"naive", ``attention`` a DecoderConfig.attention_backend
        ("padded_sdpa" = naive), ``kernels`` the ops' backend ("auto", "triton", "torch", "cpp")."""
        import dataclasses

        loss = dataclasses.replace(
            self.config.loss,
            cross_entropy=cross_entropy or self.config.loss.cross_entropy,
            contrastive=contrastive or self.config.loss.contrastive,
            kernel_backend=kernels or self.config.loss.kernel_backend)  # validates
        dec = dataclasses.replace(self.config.decoder,
                                  attention_backend=attention or self.config.decoder.attention_backend)
        self.config.loss = loss
        self.config.decoder.attention_backend = dec.attention_backend

    @property
    def task_token_ids(self) -> list[int]:
        return [self.config.decoder.vocab_size + i for i in range(len(TASK_NAMES))]

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def logit_scale_value(self) -> torch.Tensor:
        """1/τ, clamped at LossConfig.max_logit_scale (CLIP's clamp)."""
        return self.logit_scale.clamp(max=math.log(self.config.loss.max_logit_scale)).exp()

    def set_tokenizers(self, text_tokenizer, decoder_tokenizer) -> None:
        """Attach the encoder (XLM-R-style) and decoder (GPT-2-style) tokenizers.

        The decoder tokenizer must have the four task tokens at ids vocab_size..vocab_size+3
        (:func:`unigen.model.tokenizers.load_decoder_tokenizer` adds them); the [match] answers and
        eos are read from it when the config does not fix them."""
        if text_tokenizer is None or decoder_tokenizer is None:
            raise ValueError("UniGen.set_tokenizers: both text_tokenizer and decoder_tokenizer are needed")
        from unigen.model.tokenizers import check_decoder_tokenizer

        check_decoder_tokenizer(decoder_tokenizer, self.config)
        tasks = self.config.tasks
        if tasks.eos_token_id is None:
            tasks.eos_token_id = int(decoder_tokenizer.eos_token_id)
        if not tasks.match_yes_ids:
            tasks.match_yes_ids = tuple(decoder_tokenizer("yes", add_special_tokens=False)["input_ids"])
            tasks.match_no_ids = tuple(decoder_tokenizer("no", add_special_tokens=False)["input_ids"])
            tasks.__post_init__()
        self.text_tokenizer = text_tokenizer
        self.decoder_tokenizer = decoder_tokenizer

    # ---- parameter bookkeeping --------------------------------------------------------------
    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def parameter_breakdown(self) -> dict[str, dict[str, int]]:
        out = {}
        for name, mod in self.named_children():
            out[name] = {"trainable": sum(p.numel() for p in mod.parameters() if p.requires_grad),
                         "frozen": sum(p.numel() for p in mod.parameters() if not p.requires_grad)}
        out["logit_scale"] = {"trainable": 1, "frozen": 0}
        return out

    # ---- encoders ------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q-Former outputs [N, Q, Dq], visual prefix E_v [N, Q, D])."""
        return self.image_encoder(images.to(self.device))

    def encode_image_features(self, features: torch.Tensor, scales: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode_images` from the frozen ViT's stored output instead of pixels
        (``features`` ``[N, 1 + patches, vision width]`` in a :mod:`unigen.model.vit_features`
        encoding, fp8 with its per-image ``scales``): the ViT does not run."""
        from unigen.model.vit_features import dequantize, feature_shape

        expected = feature_shape(self.config.vision)
        if features.dim() != 3 or tuple(features.shape[1:]) != expected:
            raise ValueError(f"UniGen: image_features must be [N, {expected[0]}, {expected[1]}] "
                             f"(the ViT's tokens and width for vision.image_size "
                             f"{self.config.vision.image_size}), got {tuple(features.shape)}")
        dev = self.device
        feats = dequantize(features.to(dev, non_blocking=True),
                           None if scales is None else scales.to(dev, non_blocking=True))
        return self.image_encoder.from_vit_features(feats)

    def encode_texts(self, ids: torch.Tensor, mask: torch.Tensor, *, check_ids: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(XLM-R hidden states [N, L, Dt], text prefix E_t [N, L, D])."""
        return self.text_encoder(ids.to(self.device), mask.to(self.device), check_ids=check_ids)

    def _task_embeddings(self) -> torch.Tensor:
        return self.decoder.wte(_to_device(self.task_token_ids, self.device))  # [4, D]

    # ---- packing ---------------------------------------------------------------------------
    def _pack(self, task, image_index, text_index, target_ids, target_lens, img_prefix,
              txt_prefix, txt_lens, second_image_index, slot_lens: np.ndarray, host_tasks: np.ndarray):
        """Build the packed decoder input of S samples and the rows that predict targets.

        Sample s is ``E_v[image] (⊕ E_v[second image]) ⊕ E_t[text] ⊕ T_D(task) ⊕
        target[:-1]``; its row ``prefix_len - 1 + j`` predicts ``target[j]``. All of it is one
        gather from a table of every source row, so it is a single differentiable op whatever
        the task mix.

        ``slot_lens`` (host, ``[S]``): the packed length given to each sample, known before
        the step runs (from the host copy of the batch), so the packed shapes, ``cu_seqlens``
        and ``max_seqlen`` need no device read. A sample whose text is only known on the device
        (a mined negative text) gets a slot as long as the longest candidate: its rows after
        the last target input repeat its task token and, being later than every real row in a
        causal suffix, are seen by none of them and predict nothing.
        """
        dev = self.device
        Q = self.config.qformer.num_query_tokens
        D = self.config.decoder.n_embd
        S = task.numel()
        n_targets = target_ids.numel()
        if slot_lens.size and int(slot_lens.max()) > self.config.decoder.n_positions:
            s = int(slot_lens.argmax())
            raise ValueError(
                f"UniGen: sample {s} ({TASK_NAMES[int(host_tasks[s])]}) needs "
                f"{int(slot_lens[s])} decoder positions, more than decoder.n_positions = "
                f"{self.config.decoder.n_positions}; shorten its target or its text")
        cu_host = np.zeros(S + 1, dtype=np.int64)
        np.cumsum(slot_lens, out=cu_host[1:])
        T, max_seqlen = int(cu_host[-1]), int(slot_lens.max())
        cu = _to_device(cu_host, dev)
        seq_len = _to_device(slot_lens, dev)
        has_img, has_txt = image_index >= 0, text_index >= 0
        n_img = (has_img.long() + (second_image_index >= 0).long()) * Q
        n_txt = torch.where(has_txt, txt_lens[text_index.clamp(min=0)] if txt_lens.numel() else
                            torch.zeros_like(text_index), torch.zeros_like(text_index))
        prefix_len = n_img + n_txt + 1
        sample = torch.repeat_interleave(torch.arange(S, device=dev), seq_len, output_size=T)
        p = torch.arange(T, device=dev) - cu[sample]

        # One table of every source row: image prefixes, text prefixes, task tokens, targets.
        img_rows = img_prefix.reshape(-1, D) if img_prefix is not None else torch.zeros(0, D, device=dev)
        txt_rows = txt_prefix if txt_prefix is not None else torch.zeros(0, D, device=dev)
        task_rows = self._task_embeddings()
        parts = [img_rows, txt_rows, task_rows, self.decoder.wte(target_ids)]
        img_base = 0
        txt_base = img_base + img_rows.shape[0]
        task_base = txt_base + txt_rows.shape[0]
        tgt_base = task_base + len(TASK_NAMES)
        table = torch.cat([x.to(task_rows.dtype) for x in parts], 0)

        txt_cu = torch.zeros(txt_lens.numel() + 1, dtype=torch.long, device=dev)
        txt_cu[1:] = torch.cumsum(txt_lens, 0)
        tgt_cu = torch.zeros(S + 1, dtype=torch.long, device=dev)
        tgt_cu[1:] = torch.cumsum(target_lens, 0)
        s_img, s_txt = image_index[sample], text_index[sample]
        s_img2 = second_image_index[sample]
        s_nimg, s_ntxt, s_pre = n_img[sample], n_txt[sample], prefix_len[sample]
        s_task = task[sample]
        # rows of the image part: the first image's Q queries, then the second's (if any)
        img_idx = torch.where(p < Q, img_base + s_img.clamp(min=0) * Q + p,
                              img_base + s_img2.clamp(min=0) * Q + p - Q)
        target_input = torch.where(p < s_pre + target_lens[sample] - 1,
                                   tgt_base + tgt_cu[sample] + p - s_pre, task_base + s_task)
        idx = torch.where(
            p < s_nimg, img_idx,
            torch.where(p < s_nimg + s_ntxt, txt_base + txt_cu[s_txt.clamp(min=0)] + p - s_nimg,
                        torch.where(p == s_pre - 1, task_base + s_task, target_input)))
        values = table[idx]
        # target j of sample s is predicted by row cu[s] + prefix_len[s] - 1 + j (target order)
        t_sample = torch.repeat_interleave(torch.arange(S, device=dev), target_lens,
                                           output_size=n_targets)
        j = torch.arange(n_targets, device=dev) - tgt_cu[t_sample]
        predict_rows = cu[t_sample] + prefix_len[t_sample] - 1 + j
        return dict(values=values, cu_seqlens=cu.to(torch.int32),
                    prefix_lens=prefix_len.to(torch.int32), position_ids=p,
                    max_seqlen=max_seqlen, predict_rows=predict_rows, task_of_row=task[t_sample])

    def _run_decoder(self, packed) -> torch.Tensor:
        return self.decoder.forward_packed(packed["values"], packed["cu_seqlens"],
                                           packed["prefix_lens"], packed["position_ids"],
                                           packed["max_seqlen"])

    # ---- training forward --------------------------------------------------------------------
    def step_layout(self, batch: UniGenBatch) -> "_HostLayout":
        """The host-side shapes of a training step on ``batch`` (see :meth:`forward`): build it
        from the loader's host copy before moving the batch to the device (a data-parallel
        wrapper moves its inputs, this object it passes through)."""
        return _HostLayout(batch, self.config.qformer.num_query_tokens,
                           self.config.loss.same_text_positives)

    def forward(self, batch: UniGenBatch, *, generator: torch.Generator | None = None,
                validate: bool = True, layout: "_HostLayout | None" = None) -> UniGenOutput:
        """The training objective on ``batch`` (see the module docstring).

        generator: random source of the hard-negative sampling (on the model's device).
        validate: check the batch first (on the host copy; a trainer whose batches come from
        ``collate_examples``/``batch_from_task_groups`` may turn it off after the first steps).

        layout: :meth:`step_layout` of the batch's host copy. Every shape of the step (packed
        tokens, [match] samples, token counts) is read from it, so the step makes no host-device
        synchronisation. Without it the layout is built here: free for a host batch (its images
        may already be on the device); a batch already on the device has its index tensors
        copied back (a sync).
        """
        if not isinstance(batch, UniGenBatch):
            raise TypeError(f"UniGen.forward: batch must be a UniGenBatch, got {type(batch).__name__}")
        cfg = self.config
        dev = self.device
        Q = cfg.qformer.num_query_tokens
        if validate:
            batch.validate(image_size=cfg.vision.image_size, max_text_length=cfg.text.max_length,
                           decoder_vocab_size=cfg.decoder.vocab_size + len(TASK_NAMES),
                           text_vocab_size=cfg.text.vocab_size)
        S, P = batch.num_samples, batch.num_pairs
        if S == 0 and P == 0:
            raise ValueError("UniGen.forward: the batch has neither generative samples nor pairs")
        host = layout if layout is not None else self.step_layout(batch)
        if (host.num_query_tokens, host.same_text_positives, host.task.size) != (
                Q, cfg.loss.same_text_positives, S):
            raise ValueError("UniGen.forward: layout was made for another batch or model config "
                             "(build it with step_layout(batch) of this model)")
        pair_ids_host = host.pair_ids
        batch = batch.to(dev, non_blocking=True)

        # 1. encoders: each distinct image / text once.
        img_q = img_prefix = txt_hidden = txt_prefix_rows = None
        txt_lens = torch.zeros(0, dtype=torch.long, device=dev)
        if batch.images is not None and batch.num_images:
            img_q, img_prefix = self.encode_images(batch.images)
        elif batch.image_features is not None and batch.num_images:
            img_q, img_prefix = self.encode_image_features(batch.image_features,
                                                           batch.image_feature_scales)
        if batch.text_ids is not None and batch.num_texts:
            # the ids' range is the batch validation's (host) business, not a device read here
            txt_hidden, txt_prefix = self.encode_texts(batch.text_ids, batch.text_mask,
                                                       check_ids=False)
            txt_lens = _to_device(host.text_lens, dev)
            # right-padded rows → packed [sum len, D] at host-known rows (a boolean mask index
            # would read the number of True entries back from the device)
            txt_prefix_rows = txt_prefix.reshape(-1, txt_prefix.shape[-1]).index_select(
                0, _to_device(host.text_token_rows, dev))

        # 2. L_CL and hard-negative mining on the pairs (over every process's pairs under
        #    data parallelism: pair_contrastive owns that bookkeeping).
        task, image_index, text_index = batch.task.long(), batch.image_index.long(), batch.text_index.long()
        second_image_index = (batch.second_image_index.long()
                              if batch.second_image_index is not None else torch.full_like(image_index, -1))
        target_ids, target_lens = batch.target_ids.long(), batch.target_lengths()
        slot_lens, host_tasks = host.slot_lens, host.task
        scale = self.logit_scale_value()
        pair_ids = _to_device(pair_ids_host, dev) if P else batch.pair_ids.long()
        img_feat, txt_feat = self._pair_features(batch, img_q, txt_hidden)
        pairs = pair_contrastive(img_feat, txt_feat, scale, pair_ids, cfg.loss, generator)
        loss_cl = pairs.loss
        # 3a. [match] samples from the pairs: positive → "yes", mined negatives → "no".
        if P and cfg.loss.beta > 0:
            extra, extra_slots, extra_tasks = self._match_samples(batch, pairs, host, pair_ids_host)
            task = torch.cat([task, extra[0]])
            image_index = torch.cat([image_index, extra[1]])
            text_index = torch.cat([text_index, extra[2]])
            second_image_index = torch.cat([second_image_index, torch.full_like(extra[1], -1)])
            target_ids = torch.cat([target_ids, extra[3]])
            target_lens = torch.cat([target_lens, extra[4]])
            slot_lens = np.concatenate([slot_lens, extra_slots])
            host_tasks = np.concatenate([host_tasks, extra_tasks])
            host_target_lens = np.concatenate([host.target_lens, extra[5]])
        else:
            host_target_lens = host.target_lens

        # 3b/4. one packed decoder call and one fused cross-entropy call for every task.
        n_tasks = len(TASK_NAMES)
        if task.numel():
            packed = self._pack(task, image_index, text_index, target_ids, target_lens,
                                img_prefix, txt_prefix_rows, txt_lens, second_image_index,
                                slot_lens, host_tasks)
            hidden = self._run_decoder(packed)[packed["predict_rows"]]
            gen_total, means, _ = generative_losses(
                hidden, self.decoder.lm_head_weight, target_ids, packed["task_of_row"], cfg.loss)
        else:
            gen_total = self.decoder.lm_head_weight.sum() * 0.0
            means = torch.zeros(n_tasks, device=dev)
        total = gen_total + cfg.loss.contrastive_weight * loss_cl

        # Counts from the host layout: the same numbers the device holds, without reading them.
        tokens_per_task = np.bincount(host_tasks, weights=host_target_lens, minlength=n_tasks)
        samples_per_task = np.bincount(host_tasks, minlength=n_tasks)
        losses = {name: means[i].detach() for i, name in enumerate(TASK_NAMES)}
        losses["cl"] = loss_cl.detach()
        num_tokens = {name: int(tokens_per_task[i]) for i, name in enumerate(TASK_NAMES)}
        num_tokens["total"] = sum(num_tokens.values())
        return UniGenOutput(loss=total, losses=losses, temperature=(1.0 / scale).detach(),
                            num_tokens=num_tokens,
                            num_samples={n: int(samples_per_task[i]) for i, n in enumerate(TASK_NAMES)},
                            num_pairs=P)

    def _match_answer(self, yes: bool) -> list[int]:
        tasks = self.config.tasks
        if not tasks.match_yes_ids or tasks.eos_token_id is None:
            raise ValueError(
                "UniGen: the [match] task needs the decoder ids of its answers: set "
                "config.tasks.match_yes_ids / match_no_ids / eos_token_id, or attach the "
                "tokenizers with set_tokenizers() (or set loss.beta = 0 to skip [match])")
        return list(tasks.match_yes_ids if yes else tasks.match_no_ids) + [tasks.eos_token_id]

    def _pair_features(self, batch: UniGenBatch, img_q, txt_hidden):
        """The L_CL features ``[P, contrastive_dim]`` of the pairs' image and text [CLS]
        (through the projections even for P = 0, so an empty process joins the gradient)."""
        if batch.num_pairs == 0:
            return (self.image_proj(self.image_proj.weight.new_zeros(0, self.image_proj.in_features)),
                    self.text_proj(self.text_proj.weight.new_zeros(0, self.text_proj.in_features)))
        return (self.image_proj(img_q[batch.pair_image_index.long(), 0]),
                self.text_proj(txt_hidden[batch.pair_text_index.long(), 0]))

    def _match_samples(self, batch: UniGenBatch, pairs, host: "_HostLayout", pair_ids_host):
        """[match] samples of the pairs (ALBEF's ITM recipe): (v_i, t_i) → yes; with
        match_negatives, (v_i, t_neg(i)) → no and (v_neg(i), t_i) → no for every pair that has
        a non-positive candidate among this process's pairs (where
        :func:`~unigen.model.losses.pair_contrastive` mines): exactly two per such pair.

        Which pairs have a candidate is read from the host pair ids, so the number of samples
        and their slot lengths are known without a device read. Returns the device tensors
        (task, image, text, target ids, target lengths, answer lengths per sample on the host),
        the host slot lengths and the host task ids.
        """
        dev = self.device
        Q = self.config.qformer.num_query_tokens
        yes_ids, no_ids = self._match_answer(True), self._match_answer(False)
        pi, pt = batch.pair_image_index.long(), batch.pair_text_index.long()
        P = pi.numel()
        pair_text_lens = host.text_lens[host.pair_text_index]
        imgs, txts = [pi], [pt]
        slots = [Q + pair_text_lens + len(yes_ids)]
        answer_lens = [np.full(P, len(yes_ids), dtype=np.int64)]
        if self.config.loss.match_negatives and pairs.neg_text_for_image is not None:
            ids = _host_tensor(pair_ids_host).numpy()
            rows_host = np.flatnonzero((ids[:, None] != ids[None, :]).any(1))
            rows = _to_device(rows_host, dev)
            nt, ni = pairs.neg_text_for_image[rows], pairs.neg_image_for_text[rows]
            imgs += [pi[rows], pi[ni]]
            txts += [pt[nt], pt[rows]]
            # the negative text is drawn on the device: its slot fits the longest pair text
            slots += [np.full(rows_host.size, Q + int(pair_text_lens.max()) + len(no_ids)),
                      Q + pair_text_lens[rows_host] + len(no_ids)]
            answer_lens += [np.full(2 * rows_host.size, len(no_ids), dtype=np.int64)]
        img, txt = torch.cat(imgs), torch.cat(txts)
        answer_lens_host = np.concatenate(answer_lens)
        n = answer_lens_host.size
        tgt_host = np.concatenate([np.tile(yes_ids, P), np.tile(no_ids, n - P)]).astype(np.int64)
        extra = (torch.full((n,), TASK_IDS["match"], dtype=torch.long, device=dev), img, txt,
                 _to_device(tgt_host, dev), _to_device(answer_lens_host, dev), answer_lens_host)
        return extra, np.concatenate(slots).astype(np.int64), np.full(n, TASK_IDS["match"])

    # ---- inference ------------------------------------------------------------------------
    def _require_tokenizers(self, op: str):
        if self.text_tokenizer is None or self.decoder_tokenizer is None:
            raise RuntimeError(f"UniGen.{op}: no tokenizers attached; build the model with "
                               f"text_tokenizer=/decoder_tokenizer= or call set_tokenizers()")

    def _images(self, images, op: str) -> torch.Tensor:
        if images is None or (isinstance(images, (list, tuple)) and len(images) == 0):
            raise ValueError(f"UniGen.{op}: images is empty")
        v = self.config.vision
        try:
            x = preprocess_images(images, image_size=v.image_size, mean=v.image_mean, std=v.image_std)
        except (ValueError, TypeError) as e:
            raise type(e)(f"UniGen.{op}: {e}") from None
        return x.to(self.device)

    def _texts(self, texts, op: str, name: str = "texts", allow_empty: bool = False):
        self._require_tokenizers(op)
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or len(texts) == 0:
            raise ValueError(f"UniGen.{op}: {name} must be a non-empty list of strings")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not (allow_empty or t.strip()):
                raise ValueError(f"UniGen.{op}: {name}[{i}] must be a non-empty string, got {t!r}")
        enc = self.text_tokenizer(list(texts), padding=True, truncation=True,
                                  max_length=self.config.text.max_length, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device).bool()

    def _prefixes(self, task: str, img_prefix=None, txt_prefix=None, txt_mask=None,
                  second_img_prefix=None) -> list[torch.Tensor]:
        if task not in TASK_IDS:
            raise ValueError(f"UniGen: unknown task {task!r}; expected one of {TASK_NAMES}")
        emb = self._task_embeddings()[TASK_IDS[task]].unsqueeze(0)
        n = img_prefix.shape[0] if img_prefix is not None else txt_prefix.shape[0]
        out = []
        for i in range(n):
            parts = []
            if img_prefix is not None:
                parts.append(img_prefix[i])
            if second_img_prefix is not None:
                parts.append(second_img_prefix[i])
            if txt_prefix is not None:
                parts.append(txt_prefix[i][txt_mask[i]])
            parts.append(emb)
            out.append(torch.cat(parts, 0))
        return out

    @contextlib.contextmanager
    def _evaluating(self):
        """Eval mode for an inference call, restoring the caller's mode afterwards."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    def _generate(self, prefixes, max_new_tokens, num_beams, length_penalty,
                  use_cache) -> list[list[int]]:
        from unigen.model.generation import generate, generate_without_cache

        tasks = self.config.tasks
        fn = generate if use_cache else generate_without_cache
        with self._evaluating():
            return fn(self.decoder, prefixes,
                      max_new_tokens=max_new_tokens or tasks.max_new_tokens,
                      eos_token_id=tasks.eos_token_id, num_beams=num_beams or tasks.num_beams,
                      length_penalty=length_penalty)

    def _decode(self, ids: list[list[int]]) -> list[str]:
        return [self.decoder_tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]

    @torch.no_grad()
    def generate_ids(self, task: str, *, images=None, texts=None, max_new_tokens: int | None = None,
                     num_beams: int | None = None, length_penalty: float = 1.0,
                     use_cache: bool = True) -> list[list[int]]:
        """Token ids generated for ``task`` (the API below decodes them to strings)."""
        return self._generate_task(task, images, texts, max_new_tokens, num_beams, length_penalty,
                                   use_cache)

    def _generate_task(self, task, images, texts, max_new_tokens, num_beams, length_penalty,
                       use_cache, op="generate_ids", second_images=None):
        self._require_tokenizers(op)
        if task not in TASK_IDS:
            raise ValueError(f"UniGen.{op}: unknown task {task!r}; expected one of {TASK_NAMES}")
        needs_img = task in ("cap", "qus", "match")
        needs_txt = task in ("trans", "qus", "match")
        img_prefix = txt_prefix = mask = None
        if needs_img:
            _, img_prefix = self.encode_images(self._images(images, op))
        elif images is not None:
            raise ValueError(f"UniGen.{op}: task {task!r} takes no images")
        if needs_txt:
            ids, mask = self._texts(texts, op)
            _, txt_prefix = self.encode_texts(ids, mask)
        elif texts is not None:
            raise ValueError(f"UniGen.{op}: task {task!r} takes no texts")
        if img_prefix is not None and txt_prefix is not None and img_prefix.shape[0] != txt_prefix.shape[0]:
            raise ValueError(f"UniGen.{op}: got {img_prefix.shape[0]} images but "
                             f"{txt_prefix.shape[0]} texts; they must pair up")
        second = self._second_prefix(second_images, img_prefix, op)
        prefixes = self._prefixes(task, img_prefix, txt_prefix, mask, second)
        return self._generate(prefixes, max_new_tokens, num_beams, length_penalty, use_cache)

    def _second_prefix(self, second_images, img_prefix, op: str):
        """E_v of the second images (two-image prefixes), checked against the first ones."""
        if second_images is None:
            return None
        if img_prefix is None:
            raise ValueError(f"UniGen.{op}: second_images needs images")
        _, second = self.encode_images(self._images(second_images, op))
        if second.shape[0] != img_prefix.shape[0]:
            raise ValueError(f"UniGen.{op}: got {img_prefix.shape[0]} images but "
                             f"{second.shape[0]} second images")
        return second

    @torch.no_grad()
    def caption(self, images, *, max_new_tokens: int | None = None, num_beams: int | None = None,
                length_penalty: float = 1.0, use_cache: bool = True) -> list[str]:
        """English captions of ``images`` (PIL images or tensors): E_v ⊕ [cap] → text."""
        return self._decode(self._generate_task("cap", images, None, max_new_tokens, num_beams,
                                                length_penalty, use_cache, op="caption"))

    @torch.no_grad()
    def translate(self, texts, *, max_new_tokens: int | None = None, num_beams: int | None = None,
                  length_penalty: float = 1.0, use_cache: bool = True) -> list[str]:
        """English translations of ``texts`` (any language): E_t ⊕ [trans] → text."""
        return self._decode(self._generate_task("trans", None, texts, max_new_tokens, num_beams,
                                                length_penalty, use_cache, op="translate"))

    @torch.no_grad()
    def answer(self, images, questions, *, max_new_tokens: int | None = None,
               num_beams: int | None = None, length_penalty: float = 1.0,
               use_cache: bool = True, second_images=None) -> list[str]:
        """Answers to ``questions`` (any language) about ``images``: E_v ⊕ E_t ⊕ [qus] → text
        (with ``second_images``: E_v(image) ⊕ E_v(second image) ⊕ E_t ⊕ [qus])."""
        return self._decode(self._generate_task("qus", images, questions, max_new_tokens,
                                                num_beams, length_penalty, use_cache, op="answer",
                                                second_images=second_images))

    def _encode_pairs(self, images, texts, op: str):
        """(E_v, E_t, text mask) of N (image, text) pairs; call in eval mode."""
        x = self._images(images, op)
        ids, mask = self._texts(texts, op)
        if x.shape[0] != ids.shape[0]:
            raise ValueError(f"UniGen.{op}: got {x.shape[0]} images but {ids.shape[0]} texts; "
                             f"they must pair up")
        _, img_prefix = self.encode_images(x)
        _, txt_prefix = self.encode_texts(ids, mask)
        return img_prefix, txt_prefix, mask

    def _answer_logprobs(self, prefixes, answers: list[list[int]]) -> torch.Tensor:
        """[N, C]: log-probability of each answer's ids after each prefix."""
        from unigen.model.generation import sequence_logprob

        return torch.stack([sequence_logprob(self.decoder, prefixes, [a] * len(prefixes))
                            for a in answers], dim=1)

    @torch.no_grad()
    def score_answers(self, images, texts, candidates: list[str], *,
                      task: str = "qus", second_images=None) -> torch.Tensor:
        """Log-probability ``[N, C]`` of each candidate answer (tokenised as a training target:
        its decoder ids, then eos) after image ⊕ text ⊕ ``task``'s token, for N (image, text)
        pairs: ranks a closed set of answers (e.g. class keywords) instead of generating.
        ``second_images``: a second image per pair, read after the first (two-image prefixes)."""
        if task not in ("qus", "match"):
            raise ValueError(f"UniGen.score_answers: task must be 'qus' or 'match' (the tasks "
                             f"that read an image and a text), got {task!r}")
        if not isinstance(candidates, (list, tuple)) or not candidates or not all(
                isinstance(c, str) and c.strip() for c in candidates):
            raise ValueError(f"UniGen.score_answers: candidates must be a non-empty list of "
                             f"non-empty strings, got {candidates!r}")
        eos = self.config.tasks.eos_token_id
        with self._evaluating():
            img_prefix, txt_prefix, mask = self._encode_pairs(images, texts, "score_answers")
            second = self._second_prefix(second_images, img_prefix, "score_answers")
            answers = [list(self.decoder_tokenizer(c, add_special_tokens=False)["input_ids"])
                       + [eos] for c in candidates]
            return self._answer_logprobs(self._prefixes(task, img_prefix, txt_prefix, mask,
                                                        second), answers)

    def _match_prob(self, img_prefix, txt_prefix, txt_mask) -> torch.Tensor:
        prefixes = self._prefixes("match", img_prefix, txt_prefix, txt_mask)
        lp = self._answer_logprobs(prefixes, [self._match_answer(True),
                                              self._match_answer(False)])
        # P(yes | yes or no): the two answers' sequence probabilities, renormalised.
        return torch.sigmoid(lp[:, 0] - lp[:, 1])

    @torch.no_grad()
    def match(self, images, texts) -> torch.Tensor:
        """P([match] answers "yes") for each (image, text) pair, a float tensor [N]."""
        with self._evaluating():
            return self._match_prob(*self._encode_pairs(images, texts, "match"))

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        """L2-normalised contrastive embeddings [N, contrastive_dim] of the image [CLS]."""
        x = self._images(images, "embed_images")
        q, _ = self.encode_images(x)
        return F.normalize(self.image_proj(q[:, 0]).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts) -> torch.Tensor:
        """L2-normalised contrastive embeddings [N, contrastive_dim] of the text [CLS]."""
        ids, mask = self._texts(texts, "embed_texts")
        h, _ = self.encode_texts(ids, mask)
        return F.normalize(self.text_proj(h[:, 0]).float(), dim=-1)

    @torch.no_grad()
    def retrieve(self, images, texts, k: int = 16, *, batch_size: int = 256) -> RetrievalResult:
        """Image→text and text→image retrieval: contrastive top-k, then re-ranking of those k by
        the [match] probability (CCLM/BLIP's two-stage retrieval).

        batch_size: images, texts and [match] pairs per forward (bounds the memory of large
        galleries: N × k pairs are scored per direction); the results do not depend on it.
        """
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"UniGen.retrieve: k must be a positive int, got {k!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"UniGen.retrieve: batch_size must be a positive int, got "
                             f"{batch_size!r}")

        def chunked(fn, n, *tensors):
            outs = [fn(*(t[s:s + batch_size] for t in tensors)) for s in range(0, n, batch_size)]
            if isinstance(outs[0], tuple):
                return tuple(torch.cat(parts) for parts in zip(*outs))
            return torch.cat(outs)

        with self._evaluating():
            x = self._images(images, "retrieve")
            # An empty caption is still a query (IGLUE's xFlickr&CO and WIT test files hold a
            # few): it encodes as the tokenizer's bos/eos alone.
            ids, mask = self._texts(texts, "retrieve", allow_empty=True)
            q, img_prefix = chunked(self.encode_images, x.shape[0], x)
            h, txt_prefix = chunked(self.encode_texts, ids.shape[0], ids, mask)
            ie = F.normalize(self.image_proj(q[:, 0]).float(), dim=-1)
            te = F.normalize(self.text_proj(h[:, 0]).float(), dim=-1)
            sim = ie @ te.t()  # [N_img, N_txt]

            def rerank(sim_rows, kk, pair):
                top_sim, top = sim_rows.topk(kk, dim=1)
                rows = torch.arange(sim_rows.shape[0], device=sim_rows.device).repeat_interleave(kk)
                cols = top.reshape(-1)
                ii, tt = pair(rows, cols)
                prob = chunked(lambda i, t: self._match_prob(img_prefix[i], txt_prefix[t], mask[t]),
                               ii.shape[0], ii, tt).view(-1, kk)
                order = prob.argsort(dim=1, descending=True)
                return top.gather(1, order), prob.gather(1, order), top_sim.gather(1, order)

            i2t = rerank(sim, min(k, sim.shape[1]), lambda r, c: (r, c))
            t2i = rerank(sim.t(), min(k, sim.shape[0]), lambda r, c: (c, r))
            return RetrievalResult(*i2t, *t2i)

    # ---- loading and saving -----------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json, model.safetensors and the attached tokenizers to ``directory``."""
        from unigen.model.pretrained import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, map_location="cpu",
                        load_tokenizers: bool = True) -> "UniGen":
        """Rebuild a model written by :meth:`save_pretrained` (exact round trip)."""
        from unigen.model.pretrained import load_pretrained

        return load_pretrained(cls, directory, map_location=map_location,
                               load_tokenizers=load_tokenizers)

    @classmethod
    def from_pretrained_parts(cls, *, clip_dir=None, xlmr_dir=None, gpt2_dir=None,
                              qformer_checkpoint=None, config: UniGenConfig | None = None,
                              load_tokenizers: bool = True) -> "UniGen":
        """Build UniGen from local pre-trained parts (nothing is downloaded).

        clip_dir: HF CLIP ViT-L/14 directory; xlmr_dir: HF xlm-roberta-base directory (its
        tokenizer is loaded too when present); gpt2_dir: HF gpt2 directory (tokenizer likewise);
        qformer_checkpoint: LAVIS's BLIP-2 (ViT-L) checkpoint file. The sizes of the parts set the
        vision, text and decoder configs; any part left None keeps its random initialisation.
        """
        from unigen.model.image_encoder import vision_config_from_clip_dir
        from unigen.model.text_encoder import text_config_from_hf

        config = copy.deepcopy(config) if config is not None else UniGenConfig.paper()
        if clip_dir is not None:
            config.vision = vision_config_from_clip_dir(clip_dir, config.vision)
        if xlmr_dir is not None:
            config.text = text_config_from_hf(xlmr_dir, max_length=config.text.max_length,
                                              hidden_dropout=config.text.hidden_dropout,
                                              attention_dropout=config.text.attention_dropout)
        decoder = None
        if gpt2_dir is not None:
            d = config.decoder
            decoder = GPT2Decoder.from_pretrained_gpt2(
                gpt2_dir, frozen_layers=d.frozen_layers, prefix_attention=d.prefix_attention,
                attention_backend=d.attention_backend, dropout=d.dropout)
            config.decoder = copy.deepcopy(decoder.config)
        config.__post_init__()
        model = cls(config)
        if clip_dir is not None:
            model.image_encoder.load_clip_vision(clip_dir)
        if xlmr_dir is not None:
            model.text_encoder.load_hf(xlmr_dir)
        if decoder is not None:
            model._install_decoder(decoder)
        if qformer_checkpoint is not None:
            from unigen.model.lavis_remap import load_lavis_qformer_checkpoint

            load_lavis_qformer_checkpoint(model, qformer_checkpoint)
        elif _is_blip2_size(config.qformer):
            warnings.warn("UniGen.from_pretrained_parts: no qformer_checkpoint, so the paper-size "
                          "Q-Former starts from random weights (the paper initialises it from "
                          "BLIP-2's: pass init.qformer_checkpoint)", stacklevel=2)
        if load_tokenizers and xlmr_dir is not None and gpt2_dir is not None:
            from unigen.model.tokenizers import load_decoder_tokenizer, load_text_tokenizer

            try:
                text_tok = load_text_tokenizer(xlmr_dir)
                dec_tok = load_decoder_tokenizer(gpt2_dir, config.tasks.task_tokens)
            except (OSError, ValueError) as e:
                raise ValueError(f"UniGen.from_pretrained_parts: could not load the tokenizers "
                                 f"({e}); pass load_tokenizers=False to skip them") from e
            model.set_tokenizers(text_tok, dec_tok)
        return model


def _is_blip2_size(q) -> bool:
    """The Q-Former has BLIP-2's (BERT-base) size, the one its checkpoint exists for."""
    base = type(q)()
    return all(getattr(q, f) == getattr(base, f) for f in
               ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"))


def count_parameters(config: UniGenConfig | None = None) -> dict[str, dict[str, int]]:
    """Trainable/frozen parameters per part of the model ``config`` describes (default: the
    paper's), counted on the meta device: nothing is allocated or initialised."""
    with torch.device("meta"):
        model = UniGen(config if config is not None else UniGenConfig.paper())
    out = model.parameter_breakdown()
    out["total"] = {"trainable": model.num_parameters(),
                    "frozen": model.num_parameters(trainable_only=False) - model.num_parameters()}
    return out


if __name__ == "__main__":  # python -m unigen.model.unigen_model: the paper model's size
    for part, n in count_parameters().items():
        print(f"{part:>14}  trainable {n['trainable']:>12,}  frozen {n['frozen']:>12,}")
