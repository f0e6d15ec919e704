"""A Llama-style decoder: pre-norm blocks, grouped-query attention, gated MLP, RoPE.

Norms, activations and positional embeddings come from registries, so a user can add one in
their own module with a decorator and select it by name from the config.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from lingua_sweep.config import ModelConfig
from lingua_sweep.errors import UserError
from lingua_sweep.registry import Registry

NORMS: Registry = Registry("norm")
ACTIVATIONS: Registry = Registry("activation")
POSEMBEDS: Registry = Registry("posembed")

register_norm = NORMS.register
register_activation = ACTIVATIONS.register
register_posembed = POSEMBEDS.register


# --- norms: factory(dim, eps) -> nn.Module --------------------------------------------------


@register_norm("rmsnorm")
def rmsnorm(dim: int, eps: float) -> nn.Module:
    return nn.RMSNorm(dim, eps=eps)


@register_norm("layernorm")
def layernorm(dim: int, eps: float) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps, bias=False)


# --- activations: elementwise functions used as the gate of the MLP -------------------------

register_activation("silu")(F.silu)
register_activation("gelu")(F.gelu)
register_activation("relu")(F.relu)
register_activation("tanh")(torch.tanh)
register_activation("sigmoid")(torch.sigmoid)


# --- positional embeddings: factory(cfg) -> module with apply(q, k) ------------------------


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        # Not persistent: derived from the config, so checkpoints stay free of it.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        # x: [batch, heads, seq, head_dim]; rotate pairs (x1, x2) of the two halves.
        seq_len = x.shape[-2]
        cos, sin = self.cos[:seq_len].to(x.dtype), self.sin[:seq_len].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotate(q), self.rotate(k)


class NoPositionalEmbedding(nn.Module):
    """Causal attention alone carries position (NoPE)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k


@register_posembed("rope")
def rope(cfg: ModelConfig) -> nn.Module:
    return RotaryEmbedding(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)


@register_posembed("none")
def no_posembed(cfg: ModelConfig) -> nn.Module:
    return NoPositionalEmbedding()


# --- the transformer -------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, posembed: nn.Module) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        q = self.wq(x).view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = posembed(q, k)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, -1))


def ffn_hidden_dim(cfg: ModelConfig) -> int:
    hidden = int(2 * 4 * cfg.dim / 3)  # Llama's 2/3 of 4*dim keeps params equal to a GELU MLP
    if cfg.ffn_dim_multiplier is not None:
        hidden = int(cfg.ffn_dim_multiplier * hidden)
    return cfg.multiple_of * math.ceil(hidden / cfg.multiple_of)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_hidden_dim(cfg)
        self.activation = ACTIVATIONS.get(cfg.activation)
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.activation(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        make_norm = NORMS.get(cfg.norm)
        self.attention_norm = make_norm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = make_norm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, posembed: nn.Module) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), posembed)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.vocab_size is not None, "vocab_size is filled from the tokenizer before build"
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.posembed = POSEMBEDS.get(cfg.posembed)(cfg)
        # A ModuleDict keyed by index keeps FQNs stable when blocks are compiled/wrapped.
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm = NORMS.get(cfg.norm)(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def init_weights(self, seed: int) -> None:
        """Deterministic init from `seed`, independent of device and wrapping order."""
        generator = torch.Generator().manual_seed(seed)
        depth_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if param.ndim == 1:  # norm weights
                    param.fill_(1.0)
                    continue
                # Output projections of residual branches are scaled down with depth (GPT-2).
                std = depth_std if name.endswith(("wo.weight", "w2.weight")) else self.cfg.init_std
                values = torch.empty(param.shape, dtype=torch.float32)
                values.normal_(0.0, std, generator=generator)
                values.clamp_(-3 * std, 3 * std)
                param.copy_(values)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, seq, vocab], or the mean cross-entropy when `targets` is given."""
        h = self.tok_embeddings(tokens)
        for block in self.layers.values():
            h = block(h, self.posembed)
        logits = self.output(self.norm(h))
        if targets is None:
            return logits
        # fp32 softmax: bf16 log-sum-exp over a 100k vocab loses visible precision.
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def check_config(cfg: ModelConfig) -> None:
    """Shapes the config alone rules out, as one-line UserErrors instead of a failure deep in
    the first forward pass. Registry names are checked by the trainer's preflight."""
    for key in ("dim", "n_heads", "n_layers", "multiple_of", "max_seq_len"):
        if getattr(cfg, key) < 1:
            raise UserError(f"model.{key}={getattr(cfg, key)} must be at least 1")
    if cfg.vocab_size is not None and cfg.vocab_size < 1:
        raise UserError(f"model.vocab_size={cfg.vocab_size} must be at least 1 (or null)")
    if cfg.dim % cfg.n_heads:
        raise UserError(f"model.dim={cfg.dim} is not divisible by model.n_heads={cfg.n_heads}")
    n_kv = cfg.n_kv_heads
    if n_kv is not None and (n_kv < 1 or cfg.n_heads % n_kv):
        raise UserError(
            f"model.n_kv_heads={n_kv} must divide model.n_heads={cfg.n_heads} (each key/value "
            "head serves a group of query heads); or set it to null"
        )
    head_dim = cfg.dim // cfg.n_heads
    if cfg.posembed == "rope" and head_dim % 2:
        raise UserError(
            f"head dim model.dim/model.n_heads={cfg.dim}/{cfg.n_heads}={head_dim} is odd; "
            "rope rotates pairs of dims, so choose dim and n_heads for an even head dim"
        )
    if cfg.ffn_dim_multiplier is not None and cfg.ffn_dim_multiplier <= 0:
        raise UserError(f"model.ffn_dim_multiplier={cfg.ffn_dim_multiplier} must be positive")


def build_model(cfg: ModelConfig) -> Transformer:
    check_config(cfg)
    return Transformer(cfg)


def count_params(model: nn.Module, *, exclude_embedding: bool = True) -> int:
    skip = {id(p) for n, p in model.named_parameters() if "tok_embeddings" in n}
    return sum(p.numel() for p in model.parameters() if not (exclude_embedding and id(p) in skip))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params (incl. output head) + attention scores."""
    head_dim = cfg.dim // cfg.n_heads
    kv_dim = (cfg.n_kv_heads or cfg.n_heads) * head_dim
    per_layer = 2 * cfg.dim * cfg.dim + 2 * cfg.dim * kv_dim + 3 * cfg.dim * ffn_hidden_dim(cfg)
    matmul_params = cfg.n_layers * per_layer + cfg.dim * cfg.vocab_size
    return 6 * matmul_params + 12 * cfg.n_layers * cfg.dim * seq_len
