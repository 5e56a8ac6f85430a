"""A Transformer of our own, in plain PyTorch: a causal decoder (an LLM) and a bidirectional encoder.

    token ids (B, T) -> embeddings (+ learned positions, + segments) -> N x Block -> RMSNorm -> (B, T, D)
    Block:  x = x + Attention(RMSNorm(x))        multi-head self-attention, rotary positions, SDPA kernel
            x = x + FeedForward(RMSNorm(x))      position-wise SwiGLU: down(silu(gate(x)) * up(x))

Pre-norm residual blocks as in Llama, with Llama's parameter names and layout, so that a decoder with
rotary positions holds exactly the weights of a `LlamaForCausalLM` of the same size and computes the
same logits (`llama_config` converts the config; the state dict loads as it is). The same blocks make
the encoder (`causal: false`: every token sees every other, padding excepted) with the heads of the text
pretraining objectives (`ScratchForPreTraining`: masked-token prediction, next-sentence prediction, and
XLNet's two-stream attention for permutation language modelling, `two_stream`).

The modules are wrapped as transformers `PreTrainedModel`s with their own config (`model_type:
vistune_scratch`, registered with the Auto classes by `register_scratch`), so the rest of vistune takes
them wherever it takes a transformers model: `llm.from_config: {model_type: vistune_scratch, ...}`,
`save_pretrained` / `from_pretrained` (safetensors), `generate` with a KV cache, peft LoRA, the
contrastive text tower (`AutoModel` gives the bare `ScratchModel`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    DynamicCache,
    GenerationMixin,
    LlamaConfig,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

SCRATCH_TYPE = "vistune_scratch"
POSITIONS = ("rotary", "learned")
# What transformers' `generate` passes besides the inputs; anything else is refused, not swallowed.
GENERATE_FLAGS = {"return_dict", "output_attentions", "output_hidden_states"}


class ScratchConfig(PreTrainedConfig):
    """The from-scratch Transformer's shape. Field names are Llama's where Llama has the field.

    positions: `rotary` (RoPE on queries and keys, Llama's) or `learned` (a table of
    `max_position_embeddings` vectors added to the token embeddings, BERT's and GPT-2's).
    causal: a decoder (each token sees those before it) or an encoder (every token sees every token).
    type_vocab_size: BERT's segment embeddings (sentence A or B of a pair, added to the token embeddings);
    0: none (a decoder, and what Llama holds).
    """

    model_type = SCRATCH_TYPE
    vocab_size: int = 49152
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 512
    positions: str = "rotary"
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    causal: bool = True
    type_vocab_size: int = 0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.positions not in POSITIONS:
            raise ValueError(f"{SCRATCH_TYPE}: positions {self.positions!r} is not one of {POSITIONS}")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{SCRATCH_TYPE}: hidden_size {self.hidden_size} must be a multiple of num_attention_heads "
                f"{self.num_attention_heads}, and that of num_key_value_heads {self.num_key_value_heads}"
            )
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (Llama's)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: (B or 1, 1, T, head_dim)


def rotary(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> Rope:
    """RoPE's cos and sin for (B or 1, T) positions: channel pairs (i, i + head_dim/2) turn by
    position / theta^(2i / head_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions[..., None].float() * inv_freq  # (B, T, head_dim / 2)
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, rope: Rope | None) -> torch.Tensor:
    """(B, H, T, head_dim) queries or keys turned to their positions (unchanged without rotary)."""
    if rope is None:
        return x
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Multi-head self-attention (grouped keys and values when num_key_value_heads < heads), by SDPA.

    A mask is (B or 1, 1, T, S) bool, True where a query may look; None means every key (or, `causal`,
    every earlier key) is visible, which lets SDPA choose its fastest kernel."""

    def __init__(self, config: ScratchConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx, self.causal = layer_idx, config.causal
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim,
        )  # fmt: skip
        width = config.hidden_size
        self.q_proj = nn.Linear(width, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, width, bias=False)

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.view(*x.shape[:2], heads, self.head_dim).transpose(1, 2)  # (B, T, H*hd) -> (B, H, T, hd)

    def keys_values(self, x: torch.Tensor, rope: Rope | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H_kv, S, head_dim) keys (turned to their positions) and values of normalised inputs x."""
        k = rotate(self._split(self.k_proj(x), self.kv_heads), rope)
        return k, self._split(self.v_proj(x), self.kv_heads)

    def attend(
        self, x: torch.Tensor, rope: Rope | None, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Queries from x (B, T, D) look at keys and values k, v: the (B, T, D) output."""
        q = rotate(self._split(self.q_proj(x), self.heads), rope)
        causal, grouped = self.causal and mask is None, self.heads != self.kv_heads
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=grouped)
        return self.o_proj(out.transpose(1, 2).reshape(*x.shape[:2], -1))

    def forward(
        self, x: torch.Tensor, rope: Rope | None, mask: torch.Tensor | None, cache: Cache | None = None
    ) -> torch.Tensor:
        k, v = self.keys_values(x, rope)
        if cache is not None:  # earlier positions' keys and values come first
            k, v = cache.update(k, v, self.layer_idx)
        return self.attend(x, rope, k, v, mask)


class FeedForward(nn.Module):
    """Position-wise SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ScratchConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(GradientCheckpointingLayer):
    """A pre-norm residual block: attention, then the feed-forward layer, each on a normalised input."""

    def __init__(self, config: ScratchConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = FeedForward(config)

    def forward(
        self, x: torch.Tensor, rope: Rope | None, mask: torch.Tensor | None, cache: Cache | None = None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def two_streams(
        self,
        h: torch.Tensor,
        g: torch.Tensor,
        ropes: tuple[Rope | None, Rope | None],
        masks: tuple[torch.Tensor, ...],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """XLNet's two streams through this block, with the same weights: the content stream h (B, T, D)
        and the query stream g (B, P, D) both look at keys and values of the content stream only."""
        (rope_h, rope_g), (mask_h, mask_g) = ropes, masks
        hn = self.input_layernorm(h)
        k, v = self.self_attn.keys_values(hn, rope_h)
        h = h + self.self_attn.attend(hn, rope_h, k, v, mask_h)
        g = g + self.self_attn.attend(self.input_layernorm(g), rope_g, k, v, mask_g)
        return h + self.mlp(self.post_attention_layernorm(h)), g + self.mlp(self.post_attention_layernorm(g))


def build_mask(
    padding: torch.Tensor | None,
    queries: int,
    past: int,
    causal: bool,
    packed: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """The (B or 1, 1, T, past + T) bool mask of T new queries after `past` cached positions; None when
    SDPA's own (full, or causal from the first position) is the same.

    padding: (B, past + T) 1 for real tokens; packed: (B, T) position ids that restart at 0 for each
    record of a packed row (attention stays inside each record). A query that may look nowhere (a
    left-padding position) looks everywhere instead: its output is never used, and NaN would spread."""
    if padding is None and packed is None and (past == 0 or not causal):
        return None
    keys = torch.arange(past + queries, device=device)
    allowed = torch.ones(1, 1, queries, past + queries, dtype=torch.bool, device=device)
    if causal:
        allowed = (keys[None, :] <= keys[past:, None])[None, None]
    if packed is not None:
        record = (packed == 0).cumsum(-1)  # (B, T): which record of the row each token belongs to
        allowed = allowed & (record[:, None, :, None] == record[:, None, None, :])
    if padding is not None:
        allowed = allowed & padding[:, None, None, :].bool()
    return allowed | ~allowed.any(-1, keepdim=True)


class ScratchPreTrainedModel(PreTrainedModel):
    """What the from-scratch models share as transformers models (config class, init, checkpointing)."""

    config_class = ScratchConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True


class ScratchModel(ScratchPreTrainedModel):
    """The Transformer without a head: token ids (or embeddings) -> (B, T, D) normalised hidden states."""

    def __init__(self, config: ScratchConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.embed_positions = None  # rotary positions turn queries and keys instead
        if config.positions == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.embed_types = None
        if config.type_vocab_size:
            self.embed_types = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
              positions: torch.Tensor, token_type_ids: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, Rope | None]:  # fmt: skip
        """The input vectors (B, T, D), segments (0 where not given) and learned positions added, and the
        rotary angles of `positions`."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"{SCRATCH_TYPE}: pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.embed_types is not None:
            types = torch.zeros_like(positions) if token_type_ids is None else token_type_ids
            x = x + self.embed_types(types)
        elif token_type_ids is not None:
            raise ValueError(f"{SCRATCH_TYPE}: token_type_ids given, but type_vocab_size is 0")
        if self.embed_positions is not None:
            return x + self.embed_positions(positions), None
        return x, rotary(positions, self.config.head_dim, self.config.rope_theta, x.dtype)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        token_type_ids: torch.Tensor | None = None,
        **flags: bool,
    ) -> BaseModelOutputWithPast:
        """Hidden states of the inputs; `position_ids` without an `attention_mask` that restart at 0 mark
        packed records (as transformers reads them); `use_cache` keeps keys and values in `cache`;
        `token_type_ids` are segments (A: 0, B: 1) of an encoder with `type_vocab_size`."""
        _check_flags(flags)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        given = inputs_embeds if inputs_embeds is not None else input_ids
        length = given.shape[1]
        positions = position_ids
        if positions is None:
            positions = torch.arange(past, past + length, device=given.device)[None]
        x, rope = self.embed(input_ids, inputs_embeds, positions, token_type_ids)
        packed = position_ids if self.config.causal and attention_mask is None and cache is None else None
        mask = build_mask(attention_mask, length, past, self.config.causal, packed, given.device)
        for layer in self.layers:
            x = layer(x, rope, mask, cache=cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), cache=cache)


def _check_flags(flags: dict[str, bool]) -> None:
    """`generate`'s output flags are accepted when off; attentions and hidden states are not kept."""
    unknown = sorted(set(flags) - GENERATE_FLAGS)
    if unknown:
        raise TypeError(f"{SCRATCH_TYPE}: unexpected argument(s) {unknown}")
    if flags.get("output_attentions") or flags.get("output_hidden_states"):
        raise ValueError(f"{SCRATCH_TYPE}: output_attentions and output_hidden_states are not supported")


class ScratchForCausalLM(ScratchPreTrainedModel, GenerationMixin):
    """The decoder as a causal LM: hidden states -> logits over the vocabulary (tied to the embeddings)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ScratchConfig) -> None:
        super().__init__(config)
        self.model = ScratchModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_decoder(self) -> ScratchModel:
        return self.model

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **flags: bool,
    ) -> CausalLMOutputWithPast:
        """Logits of the last `logits_to_keep` positions (0: all); with `labels`, the mean next-token loss
        over labels that are not -100."""
        out = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, **flags)
        logits = self.lm_head(out.last_hidden_state[:, -logits_to_keep:])
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].flatten(0, 1).float()
            loss = F.cross_entropy(shifted, labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)


class ScratchForPreTraining(ScratchPreTrainedModel):
    """The encoder with the heads of the text pretraining objectives (`vistune.train.text`).

    lm_head (tied to the embeddings): a token from a hidden state (MLM's masked tokens, PLM's targets).
    nsp_head: IsNext / NotNext from the first token's ([CLS]) hidden state. query_embed: what XLNet's
    query stream starts from (a token it may not see, only where it stands)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ScratchConfig) -> None:
        super().__init__(config)
        self.model = ScratchModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.nsp_head = nn.Linear(config.hidden_size, 2)
        self.query_embed = nn.Embedding(1, config.hidden_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """(B, T, D) hidden states of the encoder."""
        return self.model(input_ids, attention_mask, token_type_ids=token_type_ids).last_hidden_state

    def two_stream(
        self, input_ids: torch.Tensor, content_mask: torch.Tensor,
        targets: torch.Tensor, query_mask: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """XLNet's two-stream attention: (B, P, D) query-stream states at the `targets` (B, P) positions.

        The content stream sees token ids (B, T) where `content_mask` (B, 1, T, T) lets it; the query
        stream of target p starts from `query_embed` at p's position and sees content states where
        `query_mask` (B, 1, P, T) lets it (never at p itself: it must predict that token)."""
        base = self.model
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        h, rope_h = base.embed(input_ids, None, positions)
        g = self.query_embed.weight.expand(*targets.shape, -1)
        if base.embed_positions is not None:
            g, rope_g = g + base.embed_positions(targets), None
        else:
            rope_g = rotary(targets, self.config.head_dim, self.config.rope_theta, h.dtype)
        for layer in base.layers:
            h, g = layer.two_streams(h, g, (rope_h, rope_g), (content_mask, query_mask))
        return base.norm(g)


def llama_config(config: ScratchConfig) -> LlamaConfig:
    """The `LlamaConfig` of a decoder with rotary positions: same weights, same names, same logits."""
    if config.positions != "rotary" or not config.causal or config.type_vocab_size:
        raise ValueError(
            f"a {SCRATCH_TYPE} {'decoder' if config.causal else 'encoder'} with {config.positions} positions "
            f"{' and segment embeddings' if config.type_vocab_size else ''} has no Llama equivalent; only a "
            "decoder with rotary positions and no segment embeddings converts to one"
        )
    same = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
            "initializer_range", "pad_token_id", "bos_token_id", "eos_token_id")  # fmt: skip
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    return LlamaConfig(**{name: getattr(config, name) for name in same}, rope_parameters=rope)


def register_scratch() -> None:
    """Make `model_type: vistune_scratch` known to transformers' Auto classes (config, base model, causal
    LM), so its directories load like any model's. Safe to call again."""
    if SCRATCH_TYPE in CONFIG_MAPPING:
        return
    AutoConfig.register(SCRATCH_TYPE, ScratchConfig)
    AutoModel.register(ScratchConfig, ScratchModel)
    AutoModelForCausalLM.register(ScratchConfig, ScratchForCausalLM)
