"""The four networks of SkyReels-A2 (DESIGN.md §2–3), channels-last Flax linen modules:

```python
cfg = a2jax.configs.load("a2_14b")
model = a2jax.models.A2Transformer(cfg.transformer)   # (x, t, text, image) -> velocity
vae = a2jax.models.WanVAE(cfg.vae)                      # encode(video) / decode(latents)
clip = a2jax.models.CLIPVisionEncoder(cfg.clip)         # (B, 224, 224, 3) -> (B, 257, 1280)
t5 = a2jax.models.UMT5Encoder(cfg.umt5)                 # (ids, mask) -> (B, L, 4096)
```
"""

from a2jax.models.clip import CLIPVisionEncoder
from a2jax.models.transformer import A2Transformer
from a2jax.models.umt5 import UMT5Encoder
from a2jax.models.vae import WanVAE

__all__ = ["A2Transformer", "CLIPVisionEncoder", "UMT5Encoder", "WanVAE"]
