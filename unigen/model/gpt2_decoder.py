"""The English decoder of UniGen: GPT-2 base, fed with prefix embeddings (paper §3.1, §3.3).

The encoders' outputs (768-d) and a task-token embedding form a *prefix*; the decoder continues
it in English. The decoder never computes logits in training: it returns the final hidden states
(after ``ln_f``) and the loss is taken outside by the fused linear cross-entropy op on those
states and ``wte.weight`` (the LM head is tied to the token embedding, so growing the vocabulary
with the task tokens grows the head too).

Three forward paths share the same blocks and differ only in how attention is computed:

- ``forward_packed``: the training path. Samples are packed back to back into one ``[T, D]``
  tensor (no padding) and attention runs through :func:`unigen.kernels.prefix_lm_attention`.
- ``forward_padded``: a right-padded ``[B, L, D]`` batch with a dense boolean mask and PyTorch's
  ``scaled_dot_product_attention``. This is both the readable reference the packed path is tested
  against and the naive baseline (``attention_backend="padded_sdpa"``).
- ``forward_cached``: generation. Keys and values of earlier tokens are kept in a
  :class:`KVCache`; new tokens attend to the cache and to each other.

Weights use ``nn.Linear`` (``[out, in]``). Hugging Face GPT-2 checkpoints store ``Conv1D`` weights
as ``[in, out]``; :meth:`GPT2Decoder.load_hf_gpt2_state_dict` transposes them on load.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from unigen.kernels.prefix_lm_attention import prefix_lm_attention
from unigen.model.config import DecoderConfig
from unigen.model.packing import packed_to_padded, padded_to_packed


@dataclass
class KVCache:
    """Keys and values of every block for the tokens seen so far, each ``[B, n_head, S, head_dim]``."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def seq_len(self) -> int:
        return self.keys[0].shape[2]

    def reorder(self, index: torch.Tensor) -> KVCache:
        """Rows ``index`` of the batch (beam search keeps the beams it extends; a new batch
        repeats each sample once per beam)."""
        return KVCache(
            [k.index_select(0, index) for k in self.keys], [v.index_select(0, index) for v in self.values]
        )


class SelfAttention(nn.Module):
    """GPT-2 multi-head self-attention. The attention itself is a function handed in by the
    caller (packed kernel, dense-mask SDPA, or SDPA over a KV cache): the projections and the head
    layout are the same in every path."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, attend):
        # c_attn's output is [q | k | v], each laid out as [n_head, head_dim] (as in GPT-2).
        q, k, v = self.c_attn(x).view(*x.shape[:-1], 3, self.n_head, self.head_dim).unbind(-3)
        y = attend(q, k, v)  # [..., n_head, head_dim]
        return self.c_proj(y.reshape(*x.shape[:-1], -1))


class MLP(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        # GPT-2's "gelu_new" is the tanh approximation of GELU.
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LayerNorm transformer block, parameter names as in GPT-2."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, attend):
        x = x + self.dropout(self.attn(self.ln_1(x), attend))
        return x + self.dropout(self.mlp(self.ln_2(x)))


def _check_tensor(x, name, *, ndim=None, integer=False, boolean=False, floating=False):
    where = "GPT2Decoder"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{where}: {name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if integer and x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{where}: {name} must be int32 or int64, got {x.dtype}")
    if boolean and x.dtype != torch.bool:
        raise TypeError(f"{where}: {name} must be a bool tensor, got {x.dtype}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating-point tensor, got {x.dtype}")


class GPT2Decoder(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        if not isinstance(config, DecoderConfig):
            raise TypeError(f"GPT2Decoder: config must be a DecoderConfig, got {type(config).__name__}")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.apply(self._init_weights)
        # GPT-2 scales the init of the projections that write into the residual stream by
        # 1/sqrt(2 * n_layer): two such writes per block, so the stream's variance stays bounded.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ----------------------------------------------------------------------------------------
    # vocabulary, tied head, freezing

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding (and of the tied LM head), task tokens included."""
        return self.wte.num_embeddings

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The LM head is the token embedding (weight tying, as in GPT-2)."""
        return self.wte.weight

    @torch.no_grad()
    def add_tokens(self, n: int) -> None:
        """Append ``n`` rows to the token embedding, and so to the tied head.

        New rows start at the mean of the existing rows plus N(0, 0.02²) noise: near the mean,
        the new tokens' logits start at the level of an average token instead of an arbitrary
        one, and the noise keeps the new tokens distinguishable from each other.
        Build the optimizer after calling this: ``wte.weight`` is a new parameter.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"GPT2Decoder.add_tokens: n must be a positive int, got {n!r}")
        old = self.wte.weight
        new_rows = old.mean(dim=0, keepdim=True) + 0.02 * torch.randn(
            n, old.shape[1], device=old.device, dtype=old.dtype
        )
        wte = nn.Embedding(old.shape[0] + n, old.shape[1], device=old.device, dtype=old.dtype)
        wte.weight.copy_(torch.cat([old, new_rows], dim=0))
        wte.weight.requires_grad_(old.requires_grad)
        self.wte = wte

    def freeze_configured_layers(self) -> None:
        """Stop gradients into the parameters of the blocks in ``config.frozen_blocks``.

        Gradients still flow *through* those blocks to the earlier ones and to the prefix.
        """
        for i in self.config.frozen_blocks:
            self.h[i].requires_grad_(False)

    # ----------------------------------------------------------------------------------------
    # forward paths

    def _embed(self, inputs_embeds, position_ids):
        return self.drop(inputs_embeds + self.wpe(position_ids))

    def _run_blocks(self, x, attend_for_layer):
        for i, block in enumerate(self.h):
            x = block(x, attend_for_layer(i))
        return self.ln_f(x)

    def forward_packed(self, inputs_embeds, cu_seqlens, prefix_lens, position_ids, max_seqlen: int):
        """Training path on a packed batch.

        inputs_embeds ``[T, D]``: the samples back to back; sample i spans
        ``cu_seqlens[i]:cu_seqlens[i+1]`` (int32 ``[B+1]``). prefix_lens (int32 ``[B]``): tokens of
        each sample that form the bidirectional prefix (ignored, i.e. 0, when
        ``prefix_attention == "causal"``). position_ids (int ``[T]``) restart at 0 per sample.
        max_seqlen: the longest sample. Returns the final hidden states ``[T, D]``.

        With ``attention_backend == "padded_sdpa"`` the batch is padded, run through
        ``forward_padded`` and repacked; there the positions are 0..len-1 per sample, which is
        what ``position_ids`` of a packed batch hold.
        """
        cfg = self.config
        _check_tensor(inputs_embeds, "inputs_embeds", ndim=2, floating=True)
        _check_tensor(cu_seqlens, "cu_seqlens", ndim=1, integer=True)
        _check_tensor(prefix_lens, "prefix_lens", ndim=1, integer=True)
        _check_tensor(position_ids, "position_ids", ndim=1, integer=True)
        if inputs_embeds.shape[1] != cfg.n_embd:
            raise ValueError(
                f"GPT2Decoder.forward_packed: inputs_embeds must be [T, {cfg.n_embd}], "
                f"got {tuple(inputs_embeds.shape)}"
            )
        if prefix_lens.shape[0] != cu_seqlens.shape[0] - 1:
            raise ValueError(
                f"GPT2Decoder.forward_packed: prefix_lens has {prefix_lens.shape[0]} entries but cu_seqlens "
                f"describes {cu_seqlens.shape[0] - 1} samples"
            )
        if position_ids.shape[0] != inputs_embeds.shape[0]:
            raise ValueError(
                f"GPT2Decoder.forward_packed: position_ids has {position_ids.shape[0]} entries but "
                f"inputs_embeds has {inputs_embeds.shape[0]} tokens"
            )
        # Positions restart per sample, so max_seqlen bounds them without a device sync.
        if not isinstance(max_seqlen, int) or not 1 <= max_seqlen <= cfg.n_positions:
            raise ValueError(
                "GPT2Decoder.forward_packed: max_seqlen must be an int in "
                f"[1, n_positions={cfg.n_positions}], got {max_seqlen!r}"
            )
        if cfg.prefix_attention == "causal":
            prefix_lens = torch.zeros_like(prefix_lens)

        if cfg.attention_backend == "padded_sdpa":
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            padded, _ = packed_to_padded(inputs_embeds, cu_seqlens, max_seqlen)
            out = self.forward_padded(padded, lengths, prefix_lens)
            return padded_to_packed(out, lengths)

        # validate=False: the layout is built by our own packing, and non-finite activations
        # are a diverging run, which the trainer reports on the loss with the step and the
        # remedy (on CPU the op's default would stop it here, naming only "q"); as on a GPU.
        def attend_for_layer(_):
            return lambda q, k, v: prefix_lm_attention(
                q, k, v, cu_seqlens, prefix_lens, max_seqlen=max_seqlen,
                backend=cfg.attention_backend, validate=False)

        return self._run_blocks(self._embed(inputs_embeds, position_ids), attend_for_layer)

    def forward(self, inputs_embeds, cu_seqlens, prefix_lens, position_ids, max_seqlen: int):
        """``forward_packed``, so that ``decoder(...)`` runs module hooks (DDP, FSDP, compile)."""
        return self.forward_packed(inputs_embeds, cu_seqlens, prefix_lens, position_ids, max_seqlen)

    def forward_padded(self, inputs_embeds, lengths, prefix_lens):
        """Reference path on a right-padded batch.

        inputs_embeds ``[B, L, D]``; sample b holds ``lengths[b]`` (>= 1) real tokens at positions
        0..lengths[b]-1, of which the first ``prefix_lens[b]`` form the bidirectional prefix
        (ignored when ``prefix_attention == "causal"``). Returns ``[B, L, D]``, zero at padding.
        """
        cfg = self.config
        _check_tensor(inputs_embeds, "inputs_embeds", ndim=3, floating=True)
        _check_tensor(lengths, "lengths", ndim=1, integer=True)
        _check_tensor(prefix_lens, "prefix_lens", ndim=1, integer=True)
        B, L, D = inputs_embeds.shape
        if D != cfg.n_embd:
            raise ValueError(
                f"GPT2Decoder.forward_padded: inputs_embeds must be [B, L, {cfg.n_embd}], got {(B, L, D)}"
            )
        if L > cfg.n_positions:
            raise ValueError(
                f"GPT2Decoder.forward_padded: sequence length {L} exceeds n_positions={cfg.n_positions}"
            )
        if lengths.shape[0] != B or prefix_lens.shape[0] != B:
            raise ValueError(
                f"GPT2Decoder.forward_padded: lengths and prefix_lens must have B={B} entries, got "
                f"{lengths.shape[0]} and {prefix_lens.shape[0]}"
            )
        device = inputs_embeds.device
        lengths = lengths.to(device=device, dtype=torch.long)
        prefix_lens = prefix_lens.to(device=device, dtype=torch.long)
        if B > 0 and bool(((lengths < 1) | (lengths > L)).any()):
            raise ValueError(
                f"GPT2Decoder.forward_padded: lengths must be in [1, {L}], got {lengths.tolist()}"
            )
        if B > 0 and bool(((prefix_lens < 0) | (prefix_lens > lengths)).any()):
            raise ValueError(
                "GPT2Decoder.forward_padded: prefix_lens must be in [0, lengths], "
                f"got {prefix_lens.tolist()} for lengths {lengths.tolist()}"
            )
        if cfg.prefix_attention == "causal":
            prefix_lens = torch.zeros_like(prefix_lens)

        pos = torch.arange(L, device=device)
        valid = pos[None, :] < lengths[:, None]  # [B, L]
        # Query i sees key j when j is a real token and either j <= i (causal) or j is in the
        # prefix (which for i in the prefix makes the block bidirectional; for i after the
        # prefix, j < prefix_len <= i is already causal). Padded queries see earlier real tokens,
        # so no softmax row is empty; their outputs are zeroed below.
        allowed = (pos[None, :, None] >= pos[None, None, :]) | (
            pos[None, None, :] < prefix_lens[:, None, None]
        )
        mask = (allowed & valid[:, None, :]).unsqueeze(1)  # [B, 1, L, L]

        def attend(q, k, v):  # [B, L, H, hd]
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
            )
            return y.transpose(1, 2)

        x = self._run_blocks(self._embed(inputs_embeds, pos.expand(B, L)), lambda _: attend)
        return x.masked_fill(~valid[..., None], 0.0)

    def forward_cached(
        self, inputs_embeds, position_ids, attention_mask, past: KVCache | None = None, prefix_lens=None
    ):
        """Incremental path for generation.

        inputs_embeds ``[B, L, D]``: the new tokens; position_ids ``[B, L]`` their position
        embeddings' indices; attention_mask bool ``[B, past + L]``: True at real (non-pad) key
        positions, cached ones first. New tokens attend causally to each other and to the cache.
        With ``prefix_attention == "bidirectional"``, prefix_lens (``[B]``, required on the first
        call) says how many real tokens, counted from the first True of attention_mask, form the
        bidirectional prefix; the whole prefix must be in that first call, because cached keys of
        earlier prefix tokens cannot be updated to see later ones (later calls may omit
        prefix_lens; given, it is checked against that rule).
        Returns the hidden states of the new tokens (zero at pad positions) and the grown cache.
        """
        cfg = self.config
        _check_tensor(inputs_embeds, "inputs_embeds", ndim=3, floating=True)
        _check_tensor(position_ids, "position_ids", ndim=2, integer=True)
        _check_tensor(attention_mask, "attention_mask", ndim=2, boolean=True)
        B, L, D = inputs_embeds.shape
        past_len = 0 if past is None else past.seq_len
        if D != cfg.n_embd:
            raise ValueError(
                f"GPT2Decoder.forward_cached: inputs_embeds must be [B, L, {cfg.n_embd}], got {(B, L, D)}"
            )
        if L < 1:
            raise ValueError("GPT2Decoder.forward_cached: inputs_embeds holds no token")
        if tuple(position_ids.shape) != (B, L):
            raise ValueError(
                f"GPT2Decoder.forward_cached: position_ids must be [{B}, {L}], "
                f"got {tuple(position_ids.shape)}"
            )
        if tuple(attention_mask.shape) != (B, past_len + L):
            raise ValueError(
                f"GPT2Decoder.forward_cached: attention_mask must be [B, past + L] = [{B}, {past_len + L}], "
                f"got {tuple(attention_mask.shape)}"
            )
        if past is not None and (past.batch_size != B or len(past.keys) != cfg.n_layer):
            raise ValueError(
                f"GPT2Decoder.forward_cached: past holds {len(past.keys)} layers of batch {past.batch_size}, "
                f"expected {cfg.n_layer} layers of batch {B}"
            )
        if bool(((position_ids < 0) | (position_ids >= cfg.n_positions)).any()):
            raise ValueError(
                f"GPT2Decoder.forward_cached: position_ids must be in [0, n_positions={cfg.n_positions})"
            )

        device = inputs_embeds.device
        S = past_len + L
        attention_mask = attention_mask.to(device)
        key_pos = torch.arange(S, device=device)
        query_pos = key_pos[past_len:]
        allowed = key_pos[None, None, :] <= query_pos[None, :, None]  # [1, L, S] causal
        if cfg.prefix_attention == "bidirectional":
            # Rank of every real key among the real keys: the prefix is the first prefix_lens of them.
            rank = attention_mask.long().cumsum(dim=1) - 1
            if prefix_lens is None:
                if past is None:
                    raise ValueError(
                        "GPT2Decoder.forward_cached: prefix_lens is required on the first call when "
                        "prefix_attention == 'bidirectional'"
                    )
                prefix_lens = torch.zeros(B, dtype=torch.long, device=device)
            _check_tensor(prefix_lens, "prefix_lens", ndim=1, integer=True)
            if prefix_lens.shape[0] != B:
                raise ValueError(
                    f"GPT2Decoder.forward_cached: prefix_lens must have B={B} entries, "
                    f"got {prefix_lens.shape[0]}"
                )
            prefix_lens = prefix_lens.to(device=device, dtype=torch.long)
            in_prefix = attention_mask & (rank < prefix_lens[:, None])  # [B, S]
            if past_len > 0 and bool(in_prefix[:, past_len:].any()):
                raise ValueError(
                    "GPT2Decoder.forward_cached: the bidirectional prefix must be passed whole in the first "
                    "call; this call's new tokens fall inside it"
                )
            allowed = allowed | (in_prefix[:, past_len:, None] & in_prefix[:, None, :])
        # Every query also sees itself: a left-pad query would otherwise have an empty softmax row
        # (NaN). Real queries never see pad keys, so this changes nothing for them.
        allowed = (allowed & attention_mask[:, None, :]) | (
            key_pos[None, None, :] == query_pos[None, :, None]
        )
        mask = allowed.unsqueeze(1)  # [B, 1, L, S]

        new_keys, new_values = [], []

        def attend_for_layer(i):
            def attend(q, k, v):  # [B, L, H, hd]
                q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                if past is not None:
                    k = torch.cat([past.keys[i], k], dim=2)
                    v = torch.cat([past.values[i], v], dim=2)
                new_keys.append(k)
                new_values.append(v)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)

            return attend

        x = self._run_blocks(self._embed(inputs_embeds, position_ids.to(device)), attend_for_layer)
        x = x.masked_fill(~attention_mask[:, past_len:, None], 0.0)
        return x, KVCache(new_keys, new_values)

    # ----------------------------------------------------------------------------------------
    # loading GPT-2

    def load_hf_gpt2_state_dict(self, state_dict: dict) -> None:
        """Load a Hugging Face ``GPT2Model`` / ``GPT2LMHeadModel`` state dict.

        Keys may carry the ``transformer.`` prefix of ``GPT2LMHeadModel``. Conv1D weights
        (``[in, out]``) are transposed into our ``nn.Linear`` (``[out, in]``). The causal-mask
        buffers older checkpoints carry (``attn.bias``, ``attn.masked_bias``) are skipped, and
        ``lm_head.weight`` must equal ``wte.weight`` (the head is tied). Load before
        ``add_tokens``: the checkpoint's vocabulary must match ``config.vocab_size``.
        Raises ValueError listing missing and unexpected keys, or naming a mismatched shape.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(
                f"load_hf_gpt2_state_dict: state_dict must be a dict, got {type(state_dict).__name__}"
            )
        source = {}
        lm_head = None
        for key, value in state_dict.items():
            if key == "lm_head.weight":
                lm_head = value
                continue
            name = key[len("transformer.") :] if key.startswith("transformer.") else key
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # causal-mask buffers of older checkpoints, not weights
            source[name] = value

        target = self.state_dict()
        missing = sorted(set(target) - set(source))
        unexpected = sorted(set(source) - set(target))
        if missing or unexpected:
            raise ValueError(
                "load_hf_gpt2_state_dict: the state dict does not match the decoder; "
                f"missing keys: {missing or 'none'}; unexpected keys: {unexpected or 'none'}"
            )
        converted = {}
        for name, value in source.items():
            # Conv1D stores [in, out]; every 2-D weight inside a block is a Conv1D.
            if name.startswith("h.") and name.endswith(".weight") and value.dim() == 2:
                value = value.t()
            if tuple(value.shape) != tuple(target[name].shape):
                raise ValueError(
                    f"load_hf_gpt2_state_dict: {name} has shape {tuple(value.shape)} (after transposing "
                    f"Conv1D weights) but the decoder expects {tuple(target[name].shape)}"
                )
            converted[name] = value
        if lm_head is not None and not torch.equal(
            lm_head.to(converted["wte.weight"].dtype), converted["wte.weight"]
        ):
            raise ValueError(
                "load_hf_gpt2_state_dict: lm_head.weight differs from wte.weight, but the head is tied"
            )
        self.load_state_dict(converted, strict=True)

    @classmethod
    def from_pretrained_gpt2(cls, directory, **config_overrides) -> GPT2Decoder:
        """Build the decoder from a local Hugging Face GPT-2 directory (``config.json`` and
        ``model.safetensors``, a sharded ``model.safetensors.index.json``, or
        ``pytorch_model.bin``). Nothing is downloaded. ``config_overrides`` set the
        :class:`DecoderConfig` fields GPT-2 does not have (``frozen_layers``, ``prefix_attention``,
        ``attention_backend``, ``dropout``)."""
        directory = os.fspath(directory)
        config_path = os.path.join(directory, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"from_pretrained_gpt2: no config.json in {directory!r}")
        with open(config_path) as f:
            hf = json.load(f)
        _check_supported_gpt2_config(hf)
        names = {f.name for f in fields(DecoderConfig)}
        unknown = sorted(set(config_overrides) - names)
        if unknown:
            raise ValueError(
                f"from_pretrained_gpt2: unknown config overrides {unknown}; "
                f"DecoderConfig fields are {sorted(names)}"
            )
        args = {
            "vocab_size": hf["vocab_size"],
            "n_positions": hf["n_positions"],
            "n_embd": hf["n_embd"],
            "n_layer": hf["n_layer"],
            "n_head": hf["n_head"],
            "layer_norm_epsilon": hf.get("layer_norm_epsilon", 1e-5),
        }
        args.update(config_overrides)
        state_dict = _read_checkpoint(directory)  # a missing checkpoint fails before any work
        model = cls(DecoderConfig(**args))
        model.load_hf_gpt2_state_dict(state_dict)
        return model


def _check_supported_gpt2_config(hf: dict) -> None:
    """Refuse GPT-2 variants whose math our blocks do not implement, instead of loading them wrong."""
    expected = {
        "activation_function": "gelu_new",
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "add_cross_attention": False,
    }
    # (reorder_and_upcast_attn is accepted: it only changes how fp16 attention is rounded.)
    for key, value in expected.items():
        if key in hf and hf[key] != value:
            raise ValueError(
                f"from_pretrained_gpt2: config.json has {key}={hf[key]!r}; only {value!r} is supported"
            )
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != 4 * hf.get("n_embd", 0):
        raise ValueError(
            f"from_pretrained_gpt2: config.json has n_inner={n_inner}; only 4 * n_embd is supported"
        )
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        if key not in hf:
            raise ValueError(f"from_pretrained_gpt2: config.json lacks {key!r}")


def _read_checkpoint(directory: str) -> dict:
    safetensors_path = os.path.join(directory, "model.safetensors")
    index_path = os.path.join(directory, "model.safetensors.index.json")
    bin_path = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(safetensors_path) or os.path.isfile(index_path):
        from safetensors.torch import load_file

        if os.path.isfile(safetensors_path):
            return load_file(safetensors_path)
        with open(index_path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(os.path.join(directory, shard)))
        return state
    if os.path.isfile(bin_path):
        return torch.load(bin_path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"from_pretrained_gpt2: {directory!r} has none of model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin"
    )
