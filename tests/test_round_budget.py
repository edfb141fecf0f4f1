"""FLUX.1-dev's round predicted from the architecture on the meta device: FLOPs and memory."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from benchmarking import expected_round_flops  # noqa: E402  (benchmark tooling lives in scripts/)
from round_budget import _flash_like_sdpa, round_memory  # noqa: E402


def test_attention_is_counted_as_a_flash_kernel_saves_it():
    q = torch.zeros(2, 4, 1000, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with _flash_like_sdpa(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert out.shape == q.shape
    # q, k, v, out (bf16) and the fp32 log-sum-exp per query row: no 1000 x 1000 matrix
    assert sorted(t.numel() * t.element_size() for t in saved) == [2 * 4 * 1000 * 4] + [2 * 4 * 1000 * 64 * 2] * 4


def test_flux_dev_round_flops_and_memory():
    flops = expected_round_flops("flux.1-dev")
    fwd, bwd = flops["forward_3_rows"], flops["backward_3_rows"]
    # guidance-distilled: every forward is 3 rows; 30 rollout + 27 teacher forwards, 27 backwards
    assert flops["fused"] == 57 * fwd + 27 * bwd and flops["two_pass"] == flops["fused"] + 27 * fwd
    # the linear layers alone: 2 FLOPs per weight per token, image weights on 1024 tokens, text
    # weights on 512, single-stream weights on 1536 (counted from the module shapes)
    mem = round_memory("flux.1-dev")
    assert mem["parameters"]["transformer"] == 11_901_408_320  # FLUX.1-dev's published 12 B
    assert mem["parameters"]["text_encoders"] == 4_762_310_656 + 123_060_480  # T5-XXL encoder + CLIP-L
    assert 0.9 * fwd < bwd < 1.2 * fwd  # frozen weights: activation gradients (+ LoRA), no weight gradients
    parts, act = mem["bytes"], mem["activation_detail"]
    assert mem["total_bytes"] == sum(parts.values()) and mem["rows_per_forward"] == 3
    assert parts["transformer_weights"] == 2 * 11_901_408_320
    assert parts["student_lora_weights_grads_adam_ema"] == 20 * mem["parameters"]["student_lora"]
    # checkpointing keeps block inputs + one block's saved tensors (+ its gradients): ~13x less
    assert act["checkpointed_peak"] == act["block_inputs"] + act["outside_blocks"] + 2 * act["block_max"]
    assert act["saved_total"] > 10 * act["checkpointed_peak"]
    # 57 blocks x (3 x 1024 image + 3 x 512 text tokens) x 3072 x bf16 of block inputs at least
    assert act["block_inputs"] >= 57 * 3 * (1024 + 512) * 3072 * 2
    print(f"flux.1-dev: fused round {flops['fused'] / 1e15:.2f} PFLOP, memory {mem['total_gb']} GB "
          f"(activations {parts['activations'] / 1e9:.2f} GB checkpointed, {act['saved_total'] / 1e9:.1f} GB not)")
    assert 30e9 < mem["total_bytes"] < 60e9


def test_fsdp_round_memory_shards_what_fsdp_shards_and_refuses_what_cannot_fit():
    """distributed.strategy=fsdp over N GPUs: the backbone, teacher LoRAs and the student's
    optimizer state are divided by N; text encoders, VAE, activations and the unsharded gradient
    accumulation stay whole; --validate_only's line refuses a GPU that is too small."""
    import pytest

    from diffusion_opd.config import load_config
    from diffusion_opd.errors import ConfigError
    from round_budget import fsdp_budget_line, sharded_round_memory

    ddp = round_memory("sd3.5-medium")
    one, eight = sharded_round_memory("sd3.5-medium", 1), sharded_round_memory("sd3.5-medium", 8)
    lora = ddp["parameters"]["student_lora"]
    assert eight["bytes"]["transformer_weights_shard"] == ddp["bytes"]["transformer_weights"] // 8
    assert eight["bytes"]["student_lora_grads_unsharded"] == 4 * lora + 4 * lora // 8
    for same in ("text_encoders", "vae", "activations"):
        assert eight["bytes"][same] == one["bytes"][same] == ddp["bytes"][same]
    # one GPU: everything DDP holds plus the gathered working set; eight: the backbone mostly gone
    assert one["total_bytes"] > ddp["total_bytes"] > eight["total_bytes"]
    config = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config/opd.py:mopd"),
                         ["distributed.strategy=fsdp", "mixed_precision=bf16"])
    line = fsdp_budget_line(config, 8, gpu_bytes=80 * 10**9)
    assert line.startswith("[fsdp] sd3.5-medium over 8 GPUs:") and "GB per GPU" in line
    with pytest.raises(ConfigError, match=r"^distributed.strategy: fsdp over 8 GPUs needs about [\d.]+ GB per GPU for "
                                          r"sd3.5-medium but the GPU has 8.0 GB"):
        fsdp_budget_line(config, 8, gpu_bytes=8 * 10**9)
    config.distributed.strategy = "ddp"
    assert fsdp_budget_line(config, 8, gpu_bytes=8 * 10**9) is None  # ddp: not this check


@pytest.mark.slow  # building the real-size models on the meta device takes minutes of CPU
def test_wan21_video_round_memory_from_the_architecture():
    """Wan 2.1 T2V-1.3B at its recipe geometry (81 frames, 480 px, one video): the published sizes
    (1.42 B transformer, UMT5-XXL encoder 5.68 B) and a checkpointed round that fits one GPU."""
    mem = round_memory("wan2.1-t2v-1.3b", resolution=480, images=1)
    assert mem["parameters"]["transformer"] == 1_418_996_800 and mem["parameters"]["text_encoders"] == 5_680_910_336
    assert mem["rows_per_forward"] == 2  # CFG: the uncond row in the same batch
    act = mem["activation_detail"]
    assert act["checkpointed_peak"] == act["block_inputs"] + act["outside_blocks"] + 2 * act["block_max"]
    print(f"wan2.1-t2v-1.3b: memory {mem['total_gb']} GB per GPU")
    assert 10e9 < mem["total_bytes"] < 60e9
