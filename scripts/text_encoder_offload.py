"""What prompt encoding would cost if the text encoders left the accelerator after every call:
the seconds to move SD3.5's three text encoders (T5-XXL, CLIP-L, CLIP-bigG) to the device and
back. Recorded by ``scripts/benchmark.py`` on CUDA (the round itself uses random embeddings)."""
from __future__ import annotations

import time
from typing import Optional

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _param_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def sd35_text_encoder_configs() -> list:
    """(model class, config) of the SD3.5 pipeline's text encoders: T5-XXL, CLIP-L, CLIP-bigG
    (public architectures; 4.76 B + 0.12 B + 0.69 B parameters)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    return [
        (T5EncoderModel, T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                  feed_forward_proj="gated-gelu")),
        (CLIPTextModelWithProjection, CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                     num_attention_heads=12, projection_dim=768)),
        (CLIPTextModelWithProjection, CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                     num_attention_heads=20, projection_dim=1280)),
    ]


def text_encoder_offload(device: torch.device, configs: Optional[list] = None, repeats: int = 2) -> dict:
    """Seconds to move the text encoders (default: SD3.5's, fp16, uninitialised weights of the
    real shapes) to ``device`` and back with ``Module.to``: what the policy's prompt encoding
    pays on an accelerator for every call with a new prompt (once per task per round in the
    trainer). Not part of the benchmarked round, which uses random embeddings."""
    configs = sd35_text_encoder_configs() if configs is None else configs
    with torch.device("meta"):  # no memory until to_empty, and no random init
        modules = [cls(cfg).to(torch.float16) for cls, cfg in configs]
    modules = [m.to_empty(device="cpu") for m in modules]
    nbytes = sum(_param_bytes(m.parameters()) + sum(b.numel() * b.element_size() for b in m.buffers())
                 for m in modules)
    to_dev, to_host = [], []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for m in modules:
            m.to(device)
        _sync(device)
        middle = time.perf_counter()
        for m in modules:
            m.to("cpu")
        _sync(device)
        to_dev.append(middle - start)
        to_host.append(time.perf_counter() - middle)
    return {"bytes": nbytes, "to_device_seconds": min(to_dev), "to_host_seconds": min(to_host),
            "seconds_per_encode_call": min(to_dev) + min(to_host)}


# ---------------------------------------------------------------------------- one variant
