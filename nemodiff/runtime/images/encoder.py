"""The VLM's image encoder: a Pixtral vision tower and the Mistral3 projector, in plain PyTorch.

checkpoint ──builder──▶ engine dir ──[runtime: vision encoder]──▶ Triton

`VisionEncoder.encode(images)` takes preprocessed images ([channels, H, W], H and W multiples
of the patch size; see `image_processing`) and returns, per image, one row per merged patch in
the text model's hidden size: the rows that replace the `[IMG]` embeddings of the prompt.

Tower: patch embedding (a stride-p convolution, run as one matmul over every patch of every
image), RMSNorm, then pre-norm layers of attention with a 2-D rotary embedding (row and column
of the patch) and a gated MLP. All images of a call run through the projections together;
attention runs per image, as a patch only sees patches of its own image. Projector: RMSNorm,
merging of each 2x2 block of patches, Linear, activation, Linear.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from nemodiff.engine_format import VISION_WEIGHTS_FILE, EngineConfig, VisionConfig
from nemodiff.plugins.reference import rms_norm, rotate_half

from .feature_cache import VisionFeatureCache, content_key

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}


def rotary_2d(rows: torch.Tensor, cols: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [patches, head_dim] of Pixtral's axial RoPE: the even frequencies turn with the
    patch row, the odd ones with the column, laid out for rotate-half."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=rows.device) / head_dim)
    angles = torch.cat([rows.float()[:, None] * inv_freq[None, 0::2], cols.float()[:, None] * inv_freq[None, 1::2]],
                       dim=-1)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


class VisionEncoder:
    def __init__(self, config: VisionConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", cache: VisionFeatureCache | None = None):
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.cache = cache

        def w(name: str) -> torch.Tensor:
            return weights[name].to(self.device, dtype)

        self.patch_weight = w("patch_conv").reshape(config.hidden_size, -1)  # [hidden, channels * p * p]
        self.ln_pre = w("ln_pre")
        keep = config.feature_layer if config.feature_layer >= 0 else config.num_hidden_layers + 1 + config.feature_layer
        self.layers = [{key: w(f"layers.{i}.{key}") for key in ("attn_norm", "qkv", "o", "ffn_norm", "gate_up", "down")}
                       for i in range(keep)]
        self.projector = {key: w(f"projector.{key}") for key in ("norm", "merge", "linear_1", "linear_2")}
        self.act = ACTIVATIONS[config.hidden_act]
        self.projector_act = ACTIVATIONS[config.projector_hidden_act]

    @classmethod
    def from_engine(cls, engine_dir: Path, config: EngineConfig, dtype: torch.dtype,
                    device: torch.device | str = "cpu", cache: VisionFeatureCache | None = None) -> VisionEncoder:
        if config.vision is None:
            raise ValueError(f"{engine_dir}: this engine has no vision tower (not built from a VLM checkpoint)")
        weights = load_file(str(Path(engine_dir) / VISION_WEIGHTS_FILE))
        return cls(config.vision, weights, dtype, device, cache)

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.config.patch_size, width // self.config.patch_size

    def merged_grid(self, height: int, width: int) -> tuple[int, int]:
        """Rows and columns of merged patches (= image tokens) of an image of this pixel size."""
        rows, cols = self.patch_grid(height, width)
        merge = self.config.spatial_merge_size
        return rows // merge, cols // merge

    # -- encoding ----------------------------------------------------------------------------
    def encode(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per image [channels, H, W] -> [rows * cols merged patches, text hidden]. With a cache,
        identical images (here or in earlier calls) are encoded once."""
        if self.cache is None:
            return self._encode(images)
        keys = [content_key(image) for image in images]
        found = {key: self.cache.get(key) for key in dict.fromkeys(keys)}
        missing = [key for key, value in found.items() if value is None]
        if missing:
            first = {key: images[keys.index(key)] for key in missing}
            for key, features in zip(missing, self._encode(list(first.values()))):
                found[key] = features
                self.cache.put(key, features)
        self.cache.record(hits=len(keys) - len(missing), misses=len(missing))
        return [found[key] for key in keys]

    @torch.inference_mode()
    def _encode(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        if not images:
            return []
        cfg = self.config
        grids = [self.patch_grid(image.shape[-2], image.shape[-1]) for image in images]
        for image, (rows, cols) in zip(images, grids):
            if image.dim() != 3 or image.shape[0] != cfg.num_channels or rows == 0 or cols == 0:
                raise ValueError(f"an image tensor must be [{cfg.num_channels}, H, W] with H, W >= {cfg.patch_size}; "
                                 f"got {list(image.shape)}")
        x = torch.cat([self._patches(image, rows, cols) for image, (rows, cols) in zip(images, grids)])
        x = x @ self.patch_weight.T
        x = rms_norm(x, self.ln_pre, cfg.rms_norm_eps)
        row_ids = torch.cat([torch.arange(r, device=self.device).repeat_interleave(c) for r, c in grids])
        col_ids = torch.cat([torch.arange(c, device=self.device).repeat(r) for r, c in grids])
        cos, sin = (t.to(self.dtype) for t in rotary_2d(row_ids, col_ids, cfg.head_dim, cfg.rope_theta))
        bounds = torch.tensor([0] + [r * c for r, c in grids]).cumsum(0).tolist()
        for layer in self.layers:
            x = x + self._attention(rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps), layer, cos, sin, bounds)
            gate, up = (rms_norm(x, layer["ffn_norm"], cfg.rms_norm_eps) @ layer["gate_up"].T).chunk(2, dim=-1)
            x = x + (self.act(gate) * up) @ layer["down"].T
        return self._project(x, grids, bounds)

    def _patches(self, image: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """[rows * cols, channels * p * p], row-major over the grid, each patch channel-major like the conv."""
        p, channels = self.config.patch_size, self.config.num_channels
        image = image.to(self.device, self.dtype)[:, :rows * p, :cols * p]
        return image.reshape(channels, rows, p, cols, p).permute(1, 3, 0, 2, 4).reshape(rows * cols, -1)

    def _attention(self, h: torch.Tensor, layer: dict, cos: torch.Tensor, sin: torch.Tensor,
                   bounds: list[int]) -> torch.Tensor:
        heads, head_dim = self.config.num_attention_heads, self.config.head_dim
        q, k, v = (h @ layer["qkv"].T).view(h.shape[0], 3, heads, head_dim).unbind(1)
        q = q * cos[:, None] + rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + rotate_half(k) * sin[:, None]
        out = torch.empty_like(h)
        for a, b in zip(bounds[:-1], bounds[1:]):  # a patch attends within its own image
            attn = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1),
                                                  v[a:b].transpose(0, 1))
            out[a:b] = attn.transpose(0, 1).reshape(b - a, -1)
        return out @ layer["o"].T

    def _project(self, x: torch.Tensor, grids: list[tuple[int, int]], bounds: list[int]) -> list[torch.Tensor]:
        cfg, proj, m = self.config, self.projector, self.config.spatial_merge_size
        x = rms_norm(x, proj["norm"], cfg.projector_norm_eps)
        merged = []
        for (rows, cols), a, b in zip(grids, bounds[:-1], bounds[1:]):
            grid = x[a:b].view(rows, cols, -1)[: rows // m * m, : cols // m * m]
            # each m x m block becomes one vector, channel-major then block row, block column
            block = grid.reshape(rows // m, m, cols // m, m, -1).permute(0, 2, 4, 1, 3)
            merged.append(block.reshape((rows // m) * (cols // m), -1))
        sizes = [t.shape[0] for t in merged]
        h = torch.cat(merged) @ proj["merge"].T
        h = self.projector_act(h @ proj["linear_1"].T) @ proj["linear_2"].T
        return list(h.split(sizes))
