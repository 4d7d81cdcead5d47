"""Configuration of the UniGen model: one nested ``@dataclass(kw_only=True)`` per part, the
decoder's included, and the task names (defined here once). Nothing here imports model code.

The dataclasses are the single source of truth; ``UniGenConfig.to_dict``/``from_dict`` and
``save``/``load`` (config.json) are derived from them and type-checked on the way back in.
``UniGenConfig.paper()`` is the full-size model of the paper (§4.2), ``UniGenConfig.tiny()`` a
seconds-on-CPU model with the same structure for tests and the demo.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field

from unigen.configuration import config_from_dict, config_to_dict
from unigen.kernels.prefix_lm_attention import ATTENTION_BACKENDS as KERNEL_BACKENDS

# Order fixes the task ids used in batches (UniGenBatch.task) and the decoder's task-token rows.
TASK_NAMES = ("trans", "cap", "qus", "match")
TASK_IDS = {name: i for i, name in enumerate(TASK_NAMES)}

# CLIP's normalisation constants (the ones CLIP ViT-L/14 was trained with).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(kw_only=True)
class VisionConfig:
    """The frozen CLIP ViT image backbone (paper §3.1: CLIP ViT-L/14 at 224×224)."""

    image_size: int = 224
    """Input resolution; images are resized to image_size × image_size (§4.2: 224 as in BLIP-2)."""
    patch_size: int = 14
    """ViT patch size (ViT-L/14: 14, giving 16×16 = 256 patches plus the class token)."""
    hidden_size: int = 1024
    """ViT width (ViT-L: 1024); the Q-Former's cross-attention keys/values read this width."""
    intermediate_size: int = 4096
    """ViT MLP width."""
    num_hidden_layers: int = 24
    """Layers of the pre-trained ViT (ViT-L: 24)."""
    num_attention_heads: int = 16
    """ViT attention heads."""
    layer_norm_eps: float = 1e-5
    """ViT LayerNorm epsilon."""
    hidden_act: str = "quick_gelu"
    """ViT activation (OpenAI CLIP uses quick_gelu)."""
    feature_layer: int = -2
    """Which layer's output feeds the Q-Former; -2 is the penultimate layer, as BLIP-2 does.
    Layers after it are never built, so they cost neither memory nor time."""
    frozen: bool = True
    """Keep the ViT frozen (no grad, eval mode) as in the paper (§4.2)."""
    compute_dtype: str = "float32"
    """dtype the frozen ViT runs in: "float32", "bfloat16" or "float16" (BLIP-2 runs it in
    half precision; its outputs are cast back to float32 before the trainable ln_vision)."""
    image_mean: tuple[float, float, float] = CLIP_MEAN
    """Per-channel mean used by the image preprocessing."""
    image_std: tuple[float, float, float] = CLIP_STD
    """Per-channel std used by the image preprocessing."""

    def __post_init__(self):
        for name in ("image_size", "patch_size", "hidden_size", "intermediate_size",
                     "num_hidden_layers", "num_attention_heads"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                   f"VisionConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        _check(self.image_size % self.patch_size == 0,
               f"VisionConfig.image_size ({self.image_size}) must be a multiple of "
               f"patch_size ({self.patch_size})")
        _check(self.hidden_size % self.num_attention_heads == 0,
               f"VisionConfig.hidden_size ({self.hidden_size}) must be divisible by "
               f"num_attention_heads ({self.num_attention_heads})")
        _check(-self.num_hidden_layers <= self.feature_layer <= -1
               or 1 <= self.feature_layer <= self.num_hidden_layers,
               f"VisionConfig.feature_layer must index a layer in [1, {self.num_hidden_layers}] "
               f"or [-{self.num_hidden_layers}, -1], got {self.feature_layer}")
        _check(self.compute_dtype in ("float32", "bfloat16", "float16"),
               f"VisionConfig.compute_dtype must be float32, bfloat16 or float16, "
               f"got {self.compute_dtype!r}")
        _check(len(self.image_mean) == 3 and len(self.image_std) == 3
               and all(s > 0 for s in self.image_std),
               "VisionConfig.image_mean/image_std must have 3 entries, std positive")
        self.image_mean = tuple(float(x) for x in self.image_mean)
        self.image_std = tuple(float(x) for x in self.image_std)

    @property
    def num_layers_used(self) -> int:
        """How many ViT layers run (the rest of the pre-trained ViT is dropped)."""
        if self.feature_layer < 0:
            return self.num_hidden_layers + 1 + self.feature_layer
        return self.feature_layer

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(kw_only=True)
class QFormerConfig:
    """The BLIP-2 Q-Former (a BERT-base whose query path is used; paper §3.1)."""

    num_query_tokens: int = 32
    """Learnable queries (§4.2: 32). The first query's output is the image [CLS] of L_CL (§3.3)."""
    hidden_size: int = 768
    """Q-Former width (BERT-base: 768)."""
    num_hidden_layers: int = 12
    """Q-Former layers."""
    num_attention_heads: int = 12
    """Attention heads of the self- and cross-attention."""
    intermediate_size: int = 3072
    """MLP width."""
    cross_attention_freq: int = 2
    """Cross-attention to the image features every this many layers, from layer 0 (BLIP-2: 2)."""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon (BERT's)."""
    hidden_dropout: float = 0.1
    """Dropout on residual branches (BERT's)."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities (BERT's)."""
    initializer_range: float = 0.02
    """Std of the normal initialisation of weights and queries (BERT's)."""

    def __post_init__(self):
        for name in ("num_query_tokens", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "cross_attention_freq"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                   f"QFormerConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        _check(self.hidden_size % self.num_attention_heads == 0,
               f"QFormerConfig.hidden_size ({self.hidden_size}) must be divisible by "
               f"num_attention_heads ({self.num_attention_heads})")
        for name in ("hidden_dropout", "attention_dropout"):
            _check(0.0 <= getattr(self, name) < 1.0,
                   f"QFormerConfig.{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass(kw_only=True)
class TextEncoderConfig:
    """The multilingual XLM-R text encoder (paper §3.1; base size)."""

    vocab_size: int = 250002
    """SentencePiece vocabulary of xlm-roberta-base."""
    hidden_size: int = 768
    """Width (base: 768)."""
    num_hidden_layers: int = 12
    """Layers."""
    num_attention_heads: int = 12
    """Attention heads."""
    intermediate_size: int = 3072
    """MLP width."""
    max_position_embeddings: int = 514
    """Position table size (RoBERTa offsets positions by pad_token_id + 1)."""
    pad_token_id: int = 1
    """Padding id (XLM-R: 1); also the offset of RoBERTa position ids."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    hidden_dropout: float = 0.1
    """Residual dropout."""
    attention_dropout: float = 0.1
    """Attention dropout."""
    max_length: int = 40
    """Longest encoder input in tokens, special tokens included (§4.2: 40)."""
    initializer_range: float = 0.02
    """Std of the normal initialisation of a from-scratch encoder (XLM-R's; pre-trained weights
    replace it)."""

    def __post_init__(self):
        _check(isinstance(self.initializer_range, (int, float)) and self.initializer_range > 0,
               f"TextEncoderConfig.initializer_range must be positive, got {self.initializer_range!r}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "max_length"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                   f"TextEncoderConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        _check(self.hidden_size % self.num_attention_heads == 0,
               f"TextEncoderConfig.hidden_size ({self.hidden_size}) must be divisible by "
               f"num_attention_heads ({self.num_attention_heads})")
        _check(self.max_length + self.pad_token_id + 1 <= self.max_position_embeddings,
               f"TextEncoderConfig.max_length ({self.max_length}) does not fit the position table "
               f"({self.max_position_embeddings} rows, offset {self.pad_token_id + 1})")


@dataclass(kw_only=True)
class LossConfig:
    """The objective L = L_trans + L_cap + α·L_qus + β·L_match + L_CL (paper §3.3) and which
    implementation computes each piece (fused kernels or their naive baselines)."""

    alpha: float = 1.0
    """Weight α of L_qus (§3.3; the paper does not publish its value)."""
    beta: float = 1.0
    """Weight β of L_match (§3.3; the paper does not publish its value)."""
    trans_weight: float = 1.0
    """Weight of L_trans (1 in the paper)."""
    cap_weight: float = 1.0
    """Weight of L_cap (1 in the paper)."""
    contrastive_weight: float = 1.0
    """Weight of L_CL (1 in the paper)."""
    contrastive_dim: int = 256
    """Width of the normalised projections L_CL compares (BLIP-2's 256)."""
    init_temperature: float = 0.07
    """Initial temperature τ of L_CL (learnable, §3.3; CLIP/BLIP-2 start at 0.07)."""
    max_logit_scale: float = 100.0
    """Upper clamp of 1/τ (CLIP's 100) so the learnable temperature cannot collapse."""
    contrastive_label_smoothing: float = 0.0
    """Label smoothing of the InfoNCE targets."""
    hard_negatives: str = "sample"
    """Hard-negative mining for [match] (§3.3, after ALBEF): "sample" draws ∝ softmax(sim),
    "hardest" takes the argmax, "uniform" draws uniformly among the non-positives (no
    similarity is read: the negatives of a run without L_CL, whose projections never train),
    "none" trains [match] on positives only."""
    match_negatives: bool = True
    """Add, per image-text pair, one mined negative text and one mined negative image to the
    [match] task (ALBEF's recipe: answers "no"); positives answer "yes"."""
    same_text_positives: bool = True
    """Pairs whose texts are identical count as positives of each other in L_CL (as pairs of
    one image always do), so neither InfoNCE nor the [match] mining treats an identical caption
    of another image as a negative: the loss could not tell the two texts apart, and a "no"
    for a text that is a "yes" elsewhere in the batch is a contradictory target. False: only
    pairs of the same image are positives (ALBEF's image ids)."""
    cross_entropy: str = "fused"
    """"fused": one fused linear+cross-entropy call with per-token weights (logits never
    materialised); "naive": materialise the logits and call F.cross_entropy per task."""
    contrastive: str = "fused"
    """"fused": the contrastive op with on-device mining; "naive": LAVIS-style similarity
    matrices, per-row torch.multinomial mining."""
    kernel_backend: str = "auto"
    """``backend=`` passed to the fused ops: "auto", "triton", "torch" or "cpp"."""

    def __post_init__(self):
        for name in ("alpha", "beta", "trans_weight", "cap_weight", "contrastive_weight"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
                   f"LossConfig.{name} must be a finite non-negative number, got {v!r}")
        for name in ("match_negatives", "same_text_positives"):
            _check(isinstance(getattr(self, name), bool),
                   f"LossConfig.{name} must be True or False, got {getattr(self, name)!r}")
        _check(self.contrastive_dim > 0, "LossConfig.contrastive_dim must be positive")
        _check(0 < self.init_temperature and 1.0 / self.init_temperature <= self.max_logit_scale,
               f"LossConfig.init_temperature must be in (0, 1] with 1/τ <= max_logit_scale, "
               f"got {self.init_temperature}")
        _check(0.0 <= self.contrastive_label_smoothing < 1.0,
               "LossConfig.contrastive_label_smoothing must be in [0, 1)")
        _check(self.hard_negatives in ("sample", "hardest", "uniform", "none"),
               f"LossConfig.hard_negatives must be 'sample', 'hardest', 'uniform' or 'none', "
               f"got {self.hard_negatives!r}")
        _check(self.cross_entropy in ("fused", "naive"),
               f"LossConfig.cross_entropy must be 'fused' or 'naive', got {self.cross_entropy!r}")
        _check(self.contrastive in ("fused", "naive"),
               f"LossConfig.contrastive must be 'fused' or 'naive', got {self.contrastive!r}")
        _check(self.kernel_backend in ("auto", "triton", "torch", "cpp"),
               f"LossConfig.kernel_backend must be auto, triton, torch or cpp, "
               f"got {self.kernel_backend!r}")

    def task_weight(self, task: str) -> float:
        return {"trans": self.trans_weight, "cap": self.cap_weight, "qus": self.alpha,
                "match": self.beta}[task]


@dataclass(kw_only=True)
class TaskConfig:
    """Task tokens and answers (paper §3.3). The task tokens are appended to the decoder
    vocabulary in TASK_NAMES order, so their ids are decoder.vocab_size + i."""

    task_tokens: tuple[str, str, str, str] = ("[trans]", "[cap]", "[qus]", "[match]")
    """Strings of the task tokens, in TASK_NAMES order (added to the decoder tokenizer)."""
    match_yes_ids: tuple[int, ...] = ()
    """Decoder token ids of the [match] answer "yes" (without eos). Filled from the decoder
    tokenizer by UniGen.set_tokenizers when empty."""
    match_no_ids: tuple[int, ...] = ()
    """Decoder token ids of the [match] answer "no" (without eos)."""
    eos_token_id: int | None = None
    """Decoder end-of-sequence id (GPT-2: 50256); filled from the decoder tokenizer when None."""
    max_new_tokens: int = 30
    """Default generation length of the inference API."""
    num_beams: int = 1
    """Default beam count of the inference API (1 = greedy)."""

    def __post_init__(self):
        self.task_tokens = tuple(self.task_tokens)
        _check(len(self.task_tokens) == len(TASK_NAMES) and len(set(self.task_tokens)) == 4,
               f"TaskConfig.task_tokens must be 4 distinct strings, got {self.task_tokens!r}")
        self.match_yes_ids = tuple(int(i) for i in self.match_yes_ids)
        self.match_no_ids = tuple(int(i) for i in self.match_no_ids)
        _check(bool(self.match_yes_ids) == bool(self.match_no_ids),
               "TaskConfig.match_yes_ids and match_no_ids must be set together")
        _check(not self.match_yes_ids or self.match_yes_ids != self.match_no_ids,
               "TaskConfig: match_yes_ids and match_no_ids must differ")
        _check(self.max_new_tokens > 0, "TaskConfig.max_new_tokens must be positive")
        _check(self.num_beams > 0, "TaskConfig.num_beams must be positive")


PREFIX_ATTENTION_MODES = ("causal", "bidirectional")
#: The attention op's backends, plus the model-level baseline that pads the whole batch.
ATTENTION_BACKENDS = (*KERNEL_BACKENDS, "padded_sdpa")


@dataclass(kw_only=True)
class DecoderConfig:
    vocab_size: int = 50257
    """GPT-2 vocabulary size before the task tokens are added (``add_tokens`` grows the model's
    embedding, not this field, so the same config always rebuilds the pre-trained shape)."""

    n_positions: int = 1024
    """Number of learned position embeddings: the longest sequence (prefix + text) the decoder takes."""

    n_embd: int = 768
    """Hidden size; also the width of the prefix embeddings the encoders must produce."""

    n_layer: int = 12
    """Number of transformer blocks."""

    n_head: int = 12
    """Attention heads per block; must divide ``n_embd``."""

    layer_norm_epsilon: float = 1e-5
    """Epsilon of every LayerNorm (GPT-2 uses 1e-5)."""

    frozen_layers: tuple[int, ...] | None = None
    """Blocks whose parameters ``freeze_configured_layers`` freezes; None: the middle half of
    the ``n_layer`` blocks (:attr:`frozen_blocks`), for GPT-2 base's 12 the blocks 3..8 (paper
    §4.2, "the intermediate 6 layers of the decoder are frozen"), and so derived from the depth
    of whatever GPT-2 checkpoint is loaded."""

    prefix_attention: str = "causal"
    """``"causal"``: every token sees only earlier tokens, prefix included, as GPT-2 was
    pre-trained and as the paper feeds it. ``"bidirectional"``: prefix-LM, the prefix tokens see
    each other both ways and the text sees the whole prefix."""

    attention_backend: str = "auto"
    """Backend of ``prefix_lm_attention`` in ``forward_packed`` (``"auto"``, ``"triton"``,
    ``"torch"``, ``"sdpa"``, ``"flex"``, ``"flash_attn"``; see that op), or ``"padded_sdpa"``: pad
    the whole packed batch, run ``forward_padded`` (dense mask + SDPA in every layer) and repack,
    the naive baseline the packed path is benchmarked against."""

    dropout: float = 0.0
    """Dropout on the embeddings and on each block's two residual branches (GPT-2 pre-training
    used 0.1). There is no dropout on attention probabilities: the fused attention op has none."""

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DecoderConfig: {name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"DecoderConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not self.layer_norm_epsilon > 0:
            raise ValueError(
                f"DecoderConfig: layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}"
            )
        # YAML and command-line overrides give lists; the dataclass holds a tuple.
        if self.frozen_layers is not None:
            self.frozen_layers = tuple(self.frozen_layers)
        for i in self.frozen_layers or ():
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.n_layer:
                raise ValueError(
                    f"DecoderConfig: frozen_layers must hold block indices in [0, {self.n_layer}), "
                    f"got {self.frozen_layers!r}"
                )
        if self.frozen_layers is not None and len(set(self.frozen_layers)) != len(self.frozen_layers):
            raise ValueError(f"DecoderConfig: frozen_layers has duplicates: {self.frozen_layers!r}")
        if self.prefix_attention not in PREFIX_ATTENTION_MODES:
            raise ValueError(
                f"DecoderConfig: prefix_attention must be one of {PREFIX_ATTENTION_MODES}, "
                f"got {self.prefix_attention!r}"
            )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"DecoderConfig: attention_backend must be one of {ATTENTION_BACKENDS}, "
                f"got {self.attention_backend!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DecoderConfig: dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def frozen_blocks(self) -> tuple[int, ...]:
        """The blocks frozen: ``frozen_layers``, or when None the middle ``n_layer // 2``."""
        if self.frozen_layers is not None:
            return self.frozen_layers
        k = self.n_layer // 2
        start = (self.n_layer - k) // 2
        return tuple(range(start, start + k))

    @classmethod
    def tiny(cls, **overrides) -> DecoderConfig:
        """A decoder that runs in milliseconds on a CPU, for tests."""
        args = dict(vocab_size=512, n_positions=128, n_embd=64, n_layer=4, n_head=4)
        args.update(overrides)
        return cls(**args)



@dataclass(kw_only=True)
class UniGenConfig:
    """The whole model: image encoder (vision + qformer), text encoder, decoder, loss, tasks."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    """Frozen CLIP ViT."""
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    """BLIP-2 Q-Former."""
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    """XLM-R text encoder."""
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    """GPT-2 English decoder (vocab_size is the size *before* the four task tokens)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Objective and the fused/naive switches."""
    tasks: TaskConfig = field(default_factory=TaskConfig)
    """Task tokens and answers."""

    def __post_init__(self):
        for name, cls in (("vision", VisionConfig), ("qformer", QFormerConfig),
                          ("text", TextEncoderConfig), ("decoder", DecoderConfig),
                          ("loss", LossConfig), ("tasks", TaskConfig)):
            v = getattr(self, name)
            if isinstance(v, dict):
                setattr(self, name, config_from_dict(cls, v, prefix=name))
            elif not isinstance(v, cls):
                raise TypeError(f"UniGenConfig.{name} must be a {cls.__name__}, "
                                f"got {type(v).__name__}")
        n_prefix_max = self.qformer.num_query_tokens + self.text.max_length + 1
        _check(n_prefix_max < self.decoder.n_positions,
               f"UniGenConfig: the longest decoder prefix ({n_prefix_max} = queries + "
               f"text.max_length + task token) leaves no room in decoder.n_positions "
               f"({self.decoder.n_positions})")

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def config_presets(cls) -> dict:
        """The names a config file or override may give the model section (``model: tiny``,
        ``--model=paper``); fields beside ``preset:`` change the preset."""
        return {"paper": cls.paper, "tiny": cls.tiny}

    @classmethod
    def paper(cls, **overrides) -> "UniGenConfig":
        """The full-size model of §4.2: CLIP ViT-L/14 (224), Q-Former with 32 queries,
        xlm-roberta-base (40 tokens), GPT-2 base with its middle 6 layers frozen, width 768."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "UniGenConfig":
        """A seconds-on-CPU model with the paper's structure (tests, the demo)."""
        kw = dict(
            vision=VisionConfig(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96,
                                num_hidden_layers=3, num_attention_heads=4),
            # No dropout: at width 32 it drowns the small differences between inputs that the
            # tests need to learn from (contrastive features, overfitting).
            # BERT's init std 0.02 is ~0.55/sqrt(768); at width 32 it makes every query attend
            # uniformly to all patches and scales the image signal down ~100x behind the
            # post-norm residual, and a from-scratch Q-Former then never learns *where* an object
            # is (a position probe stayed at chance for 600 steps; at 0.1 it reached 80% in 400).
            qformer=QFormerConfig(num_query_tokens=4, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  hidden_dropout=0.0, attention_dropout=0.0,
                                  initializer_range=0.1),
            text=TextEncoderConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=64, max_length=16,
                                   hidden_dropout=0.0, attention_dropout=0.0),
            decoder=DecoderConfig.tiny(),
            loss=LossConfig(contrastive_dim=16),
        )
        kw.update(overrides)
        return cls(**kw)

    def with_naive_baselines(self) -> "UniGenConfig":
        """A copy where every fused piece uses its naive counterpart (materialised logits,
        padded SDPA attention, LAVIS-style mining): the end-to-end benchmark's baseline."""
        cfg = copy.deepcopy(self)
        cfg.loss.cross_entropy = "naive"
        cfg.loss.contrastive = "naive"
        cfg.decoder.attention_backend = "padded_sdpa"
        return cfg

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UniGenConfig":
        """Type-checked, through the same loader as YAML configs (unknown keys and bad values
        raise :class:`~unigen.configuration.ConfigError` naming the key)."""
        return config_from_dict(cls, d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "UniGenConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
