"""PyTorch oracle of nanochat's GPT (docs/numerics.md#model), written from upstream's rules alone.

Property tests compare the JAX model against this module, so it deliberately shares no
code with it: window sizes, value-embedding layers and vocab padding are re-derived here
from upstream's rules, and only `GPTConfig` (a plain field holder) is taken from nanochat_jax.
Parameter names, shapes and storage dtypes equal nanochat's state_dict, so a real
nanochat checkpoint loads with `load_state_dict(strict=True)`.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat_jax.config import GPTConfig

ROTARY_BASE = 100000.0
ROTARY_LENGTH_FACTOR = 10  # rotary tables cover 10 × sequence_len positions
SOFTCAP = 15.0
QK_SCALE = 1.2
SMEAR_CHANNELS = 24
VE_GATE_CHANNELS = 12
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def default_compute_dtype() -> torch.dtype:
    """nanochat's COMPUTE_DTYPE: $NANOCHAT_DTYPE, else bf16 on CUDA SM80+, else fp32."""
    name = os.environ.get("NANOCHAT_DTYPE")
    if name:
        if name not in _DTYPES:
            raise ValueError(f"NANOCHAT_DTYPE={name!r} must be one of {sorted(_DTYPES)}")
        return _DTYPES[name]
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
        return torch.bfloat16
    return torch.float32


def padded_vocab(vocab_size: int) -> int:
    return math.ceil(vocab_size / 64) * 64


def has_value_embedding(layer_idx: int, n_layer: int) -> bool:
    """Alternating layers, the last one always included."""
    return layer_idx % 2 == (n_layer - 1) % 2


def window_sizes(config: GPTConfig) -> list[int]:
    """Per-layer left window (query i sees keys i-left..i), from config.sequence_len."""
    seq_len = config.sequence_len
    short = math.ceil(math.ceil(seq_len / 4) / 128) * 128
    pattern = config.window_pattern
    lefts = [seq_len if pattern[i % len(pattern)] == "L" else short for i in range(config.n_layer)]
    lefts[-1] = seq_len
    return lefts


def sliding_window_mask(T: int, left: int, device=None) -> torch.Tensor:
    """(T, T) bool, True where query i may attend key j: i - left <= j <= i."""
    i_T1 = torch.arange(T, device=device)[:, None]
    j_1T = torch.arange(T, device=device)[None, :]
    return (j_1T <= i_T1) & (j_1T >= i_T1 - left)


def norm(x: torch.Tensor) -> torch.Tensor:
    """Weightless RMSNorm; eps=None means finfo(x.dtype).eps (2⁻⁷ in bf16)."""
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x_BTNh: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split pairing (j, j+hd/2) with nanochat's sign, i.e. a rotation by -θ."""
    half = x_BTNh.size(-1) // 2
    x1, x2 = x_BTNh[..., :half], x_BTNh[..., half:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], dim=-1)


class Linear(nn.Module):
    """Bias-free linear with an fp32 master weight cast to the activation dtype per call."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        C, kv_dim = config.n_embd, config.n_kv_head * self.head_dim
        self.c_q = Linear(C, config.n_head * self.head_dim)
        self.c_k = Linear(C, kv_dim)
        self.c_v = Linear(C, kv_dim)
        self.c_proj = Linear(C, C)
        if has_value_embedding(layer_idx, config.n_layer):
            self.ve_gate = Linear(VE_GATE_CHANNELS, config.n_kv_head)
        else:
            self.ve_gate = None

    def forward(self, x_BTC, ve_BTD, cos, sin, mask_TT):
        B, T, C = x_BTC.shape
        q = self.c_q(x_BTC).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x_BTC).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x_BTC).view(B, T, self.n_kv_head, self.head_dim)
        if ve_BTD is not None:
            gate_BTN = 3 * torch.sigmoid(self.ve_gate(x_BTC[..., :VE_GATE_CHANNELS]))
            v = v + gate_BTN[..., None] * ve_BTD.view(B, T, self.n_kv_head, self.head_dim)
        q = norm(apply_rotary(q, cos, sin)) * QK_SCALE
        k = norm(apply_rotary(k, cos, sin)) * QK_SCALE
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask_TT, enable_gqa=True
        )
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x_BTC):
        return self.c_proj(F.relu(self.c_fc(x_BTC)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x_BTC, ve_BTD, cos, sin, mask_TT):
        x_BTC = x_BTC + self.attn(norm(x_BTC), ve_BTD, cos, sin, mask_TT)
        return x_BTC + self.mlp(norm(x_BTC))


class GPT(nn.Module):
    """nanochat's GPT in the no-KV-cache (training / naive generation) path.

    `dtype` is the compute dtype (nanochat's COMPUTE_DTYPE); master weights stay fp32
    except wte and value_embeds, which are stored in it (fp32 under fp16). `device` is
    where the weights are created and drawn. Weights are initialized with
    `init_weights(seed=42)` on construction.
    """

    def __init__(self, config: GPTConfig, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"):
        super().__init__()
        self.config = config
        self.compute_dtype = dtype if dtype is not None else default_compute_dtype()
        L, C, V = config.n_layer, config.n_embd, config.vocab_size
        Vp = padded_vocab(V)
        kv_dim = config.n_kv_head * (C // config.n_head)
        self.ve_layers = [i for i in range(L) if has_value_embedding(i, L)]
        self.window_lefts = window_sizes(config)
        with torch.device("meta"):  # shapes only: init_weights draws every value
            self.transformer = nn.ModuleDict(
                {"wte": nn.Embedding(Vp, C), "h": nn.ModuleList([Block(config, i) for i in range(L)])}
            )
            self.lm_head = Linear(C, Vp)
            self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(Vp, kv_dim) for i in self.ve_layers})
            self.resid_lambdas = nn.Parameter(torch.empty(L))
            self.x0_lambdas = nn.Parameter(torch.empty(L))
            self.smear_gate = Linear(SMEAR_CHANNELS, 1)
            self.smear_lambda = nn.Parameter(torch.empty(1))
            self.backout_lambda = nn.Parameter(torch.empty(1))
        self.to_empty(device=device)
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.init_weights()

    def _rotary_tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape (1, 10·sequence_len, 1, hd/2), computed in fp32, stored in CD."""
        head_dim = self.config.n_embd // self.config.n_head
        inv_freq = 1.0 / (ROTARY_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        t = torch.arange(ROTARY_LENGTH_FACTOR * self.config.sequence_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        return (
            freqs.cos().to(self.compute_dtype)[None, :, None, :],
            freqs.sin().to(self.compute_dtype)[None, :, None, :],
        )

    @torch.no_grad()
    def init_weights(self, seed: int = 42) -> None:
        """nanochat's init (docs/numerics.md#init): its draw order, from a generator on the weights' device."""
        device = self.lm_head.weight.device
        gen = torch.Generator(device=device).manual_seed(seed)
        L, C = self.config.n_layer, self.config.n_embd
        s = 3**0.5 * C**-0.5
        embeddings = [self.transformer.wte, *self.value_embeds.values()]
        for emb in embeddings:  # draw in fp32 even when re-initializing a cast model
            emb.float()

        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8, generator=gen)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001, generator=gen)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -s, s, generator=gen)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s, generator=gen)
            nn.init.zeros_(block.mlp.c_proj.weight)
        for i in range(L):
            frac = i / max(L - 1, 1)
            self.resid_lambdas[i] = 1.15 - 0.10 * frac
            self.x0_lambdas[i] = 0.20 - 0.15 * frac
        self.smear_lambda.fill_(0.0)
        self.backout_lambda.fill_(0.2)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02, generator=gen)
        for i in self.ve_layers:
            nn.init.uniform_(self.value_embeds[str(i)].weight, -s, s, generator=gen)
        for i in self.ve_layers:
            nn.init.uniform_(self.transformer.h[i].attn.ve_gate.weight, 0.0, 0.02, generator=gen)

        self.cos, self.sin = self._rotary_tables(device)
        if self.compute_dtype != torch.float16:  # fp16 keeps fp32 tables for GradScaler
            for emb in embeddings:
                emb.to(dtype=self.compute_dtype)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_reduction: str = "mean"):
        """idx (B, T) int64 → fp32 softcapped logits (B, T, V), or the fp32 CE loss with targets."""
        B, T = idx.shape
        assert T <= self.cos.size(1), f"sequence length {T} exceeds the rotary table {self.cos.size(1)}"
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        masks = {left: sliding_window_mask(T, left, idx.device) for left in set(self.window_lefts)}

        x_BTC = norm(self.transformer.wte(idx).to(self.compute_dtype))
        gate_BT1 = self.smear_lambda.to(x_BTC.dtype) * torch.sigmoid(self.smear_gate(x_BTC[:, 1:, :SMEAR_CHANNELS]))
        x_BTC = torch.cat([x_BTC[:, :1], x_BTC[:, 1:] + gate_BT1 * x_BTC[:, :-1]], dim=1)
        x0_BTC = x_BTC

        backout_layer = self.config.n_layer // 2
        for i, block in enumerate(self.transformer.h):
            x_BTC = self.resid_lambdas[i].to(x_BTC.dtype) * x_BTC + self.x0_lambdas[i].to(x_BTC.dtype) * x0_BTC
            ve_BTD = self.value_embeds[str(i)](idx).to(x_BTC.dtype) if str(i) in self.value_embeds else None
            x_BTC = block(x_BTC, ve_BTD, cos, sin, masks[self.window_lefts[i]])
            if i == backout_layer:
                x_backout_BTC = x_BTC
        x_BTC = x_BTC - self.backout_lambda.to(x_BTC.dtype) * x_backout_BTC

        logits_BTV = self.lm_head(norm(x_BTC))[..., : self.config.vocab_size].float()
        logits_BTV = SOFTCAP * torch.tanh(logits_BTV / SOFTCAP)
        if targets is None:
            return logits_BTV
        return F.cross_entropy(
            logits_BTV.view(-1, logits_BTV.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction
        )
