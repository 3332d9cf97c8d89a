"""The CLIP text transformer: OpenAI CLIP ViT-L/14 (SD 1) and OpenCLIP ViT-H/14 (SD 2).

Both towers are the same pre-LN causal transformer; they differ in size, activation and how many
layers run (SD 2 stops at OpenCLIP's penultimate layer, which its preset expresses as
``layers=23``). The final layer norm is applied to the output of the last layer that runs.
Module names give the ``state_dict`` keys of transformers' ``CLIPTextModel``
(``text_model.encoder.layers.0.self_attn.q_proj.weight``...). Positions are always
``0..max_length-1``, so there is no ``position_ids`` buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openldm.config import TextConfig
from openldm.nn.upcast import compute_dtype

LAYER_NORM_EPS = 1e-5


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v projections."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, width = x.shape
        q, k, v = (self._split_heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, width))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, mlp_width: int, activation: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)
        self.activation = quick_gelu if activation == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.width, eps=LAYER_NORM_EPS)
        self.self_attn = CLIPAttention(config.width, config.heads)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=LAYER_NORM_EPS)
        self.mlp = CLIPMLP(config.width, config.mlp_width, config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.max_length, config.width)
        # Vectors of ids from vocab_size up (textual inversion); not part of the state dict.
        self.added: torch.Tensor | None
        self.register_buffer("added", None, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        vocab = self.token_embedding.num_embeddings
        extra = input_ids >= vocab
        if self.added is None or not bool(extra.any()):
            return self.token_embedding(input_ids) + self.position_embedding.weight
        x = self.token_embedding(input_ids.masked_fill(extra, 0))
        x[extra] = self.added[input_ids[extra] - vocab].to(x.dtype)
        return x + self.position_embedding.weight


class CLIPEncoder(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.layers))

    def forward(self, x: torch.Tensor, skip_layers: int = 0) -> torch.Tensor:
        for layer in self.layers[: len(self.layers) - skip_layers]:
            x = layer(x)
        return x


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width, eps=LAYER_NORM_EPS)

    def forward(self, input_ids: torch.Tensor, skip_layers: int = 0) -> torch.Tensor:
        return self.final_layer_norm(self.encoder(self.embeddings(input_ids), skip_layers))


class CLIPTextEncoder(nn.Module):
    """``forward(input_ids: LongTensor[B, max_length]) -> Tensor[B, max_length, width]``."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def forward(self, input_ids: torch.Tensor, skip_layers: int = 0) -> torch.Tensor:
        """``skip_layers``: leave out the last layers (the web UI's clip skip N is ``N - 1``); the final
        layer norm is applied to the output of the last layer that runs."""
        self._check_ids(input_ids)
        if not 0 <= skip_layers < self.config.layers:
            raise ValueError(
                f"skip_layers must be between 0 and {self.config.layers - 1} for this "
                f"{self.config.layers}-layer text encoder, got {skip_layers}"
            )
        return self.text_model(input_ids, skip_layers)

    def set_added_tokens(self, vectors: torch.Tensor | None) -> None:
        """Vectors ``[n, width]`` for the ids ``vocab_size .. vocab_size + n - 1`` (None: no added ids)."""
        if vectors is not None and (vectors.ndim != 2 or vectors.shape[1] != self.config.width):
            raise ValueError(
                f"added token vectors must be [n, {self.config.width}], got {list(vectors.shape)}"
            )
        embedding = self.text_model.embeddings.token_embedding
        self.text_model.embeddings.added = (
            None if vectors is None else vectors.to(embedding.weight.device, compute_dtype(embedding))
        )

    def vocabulary_size(self) -> int:
        """The ids this encoder takes: its vocabulary and any added tokens."""
        added = self.text_model.embeddings.added
        return self.config.vocab_size + (0 if added is None else added.shape[0])

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        length = self.config.max_length
        if input_ids.ndim != 2 or input_ids.shape[1] != length:
            raise ValueError(
                f"input_ids must have shape [batch, {length}], got {list(input_ids.shape)}; "
                "tokenize prompts with openldm.tokenizer.CLIPTokenizer, which pads and truncates to it"
            )
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.numel() == 0:
            return
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.vocabulary_size():
            raise ValueError(
                f"input_ids must lie in [0, {self.vocabulary_size()}), got values in [{low}, {high}]; "
                "does the tokenizer match this text encoder?"
            )
