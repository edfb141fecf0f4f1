"""The policy's speed levers on the tiny SD3 (CPU): what they remove, and that the maths stays.

Casts are counted with torch.profiler under the CPU's bf16 autocast (the same autocast code path
a CUDA run takes, minus CUDA's extra fp32 ops); adapter switching under compilation is counted
with torch._dynamo's own frame counters.
"""
import pytest
import torch
from torch.profiler import profile

from diffusion_opd.models import BASE, STUDENT, PromptEmbeds, build_policy
from diffusion_opd.models.lora import AdapterSwitch



def random_embeds(pol, n=3, tokens=12, seed=0):
    """Conditioning of the transformer's real widths without running the text encoders."""
    cfg, gen = pol.transformer.config, torch.Generator().manual_seed(seed)

    def draw(rows):
        width = cfg.get("joint_attention_dim") or cfg.get("text_dim")
        shapes = {"prompt_embeds": (tokens, width), "pooled_prompt_embeds": (cfg.get("pooled_projection_dim"),)}
        return {k: torch.ones(rows, tokens, dtype=pol.dtype) if k == "prompt_embeds_mask"  # Qwen-Image: every token real
                else torch.randn(rows, *shapes[k], generator=gen).to(pol.dtype) for k in pol.embed_keys}

    return PromptEmbeds([f"p{i}" for i in range(n)], draw(n), draw(1))


def _perturb_student(policy, seed=0, std=0.1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def _student_grads(pol, x, embeds):
    for p in pol.trainable_parameters():
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = pol.velocity(x, 0.5, embeds, STUDENT, 4.5)
    v.square().mean().backward()
    return v.detach(), [p.grad.clone() for p in pol.trainable_parameters()]


def test_autocast_drops_peft_activation_casts_bit_identically(tiny_sd3_dir, monkeypatch):
    """bf16 backbone + fp32 student LoRA under autocast: peft upcasts every activation entering
    a LoRA layer to fp32 and autocast casts it straight back (and the same twice in backward).
    With the lever those (B, tokens, width) casts are gone and the student's output and
    gradients are bit-identical (both roundings were exact)."""
    pol = build_policy(tiny_sd3_dir, dtype="bf16")
    _perturb_student(pol)
    embeds = random_embeds(pol)
    x = torch.randn(3, *pol.latent_shape(64), generator=torch.Generator().manual_seed(1))
    width = pol.transformer.config.num_attention_heads * pol.transformer.config.attention_head_dim

    def activation_casts():
        with profile(record_shapes=True) as prof:
            out = _student_grads(pol, x, embeds)
        casts = [e for e in prof.events() if e.name == "aten::_to_copy" and len(e.input_shapes[0]) == 3
                 and e.input_shapes[0][-1] == width]
        return len(casts), out

    lever_on, (v_on, g_on) = activation_casts()
    with monkeypatch.context() as m:  # today's behaviour: peft's input cast left on
        m.setattr(AdapterSwitch, "input_casting", lambda self, enabled: None)
        pol._switch._input_casting = True
        for layer in pol._switch.layers:
            layer.cast_input_dtype_enabled = True
        lever_off, (v_off, g_off) = activation_casts()
    print(f"activation-sized casts per student fwd+bwd: {lever_off} -> {lever_on}")
    assert lever_off >= 4 * 8 and lever_on == 0  # >= 8 LoRA layers in the 2-block model, 4 casts each
    assert torch.equal(v_on, v_off)
    assert all(torch.equal(a, b) for a, b in zip(g_on, g_off))
    # without autocast the cast is needed again (bf16 activations meet fp32 LoRA weights)
    with torch.no_grad():
        pol.velocity(x, 0.5, embeds, STUDENT, 4.5)
    assert all(layer.cast_input_dtype_enabled for layer in pol._switch.layers)


def test_cfg_rows_are_built_once_per_embedding_batch(tiny_sd3_dir):
    """A rollout calls the same embeddings ~20 times; the [uncond, cond] batch is concatenated once."""
    pol = build_policy(tiny_sd3_dir)
    embeds = random_embeds(pol)
    x = torch.randn(3, *pol.latent_shape(64), generator=torch.Generator().manual_seed(1))

    def cats(reuse: bool):
        with torch.no_grad(), profile() as prof:
            outs = [pol.velocity(x, 0.5, embeds if reuse else embeds.select(range(3)), STUDENT, 4.5)
                    for _ in range(4)]
        return sum(e.name == "aten::cat" for e in prof.events()), outs

    reused, outs = cats(True)
    fresh, outs_fresh = cats(False)
    # fresh embeddings concatenate both tensors (prompt_embeds, pooled) at every call
    assert fresh - reused == 2 * 3
    assert all(torch.equal(a, b) for a, b in zip(outs + outs_fresh, outs[:1] * 8))
    rows = embeds.cfg_rows()["prompt_embeds"]
    assert torch.equal(rows[3:], embeds.cond["prompt_embeds"])
    assert torch.equal(rows[:3], embeds.uncond["prompt_embeds"].expand(3, -1, -1))


@pytest.fixture(scope="module")
def teacher_policy(tiny_sd3_dir, tiny_teacher_dirs):
    pol = build_policy(tiny_sd3_dir, teachers=[dict(name="gen", path=tiny_teacher_dirs["peft"]),
                                               dict(name="ocr", path=tiny_teacher_dirs["diffusers"])])
    _perturb_student(pol)
    return pol


def test_mixed_adapter_batch_equals_one_forward_per_teacher(tiny_family):
    """Teacher rows of several tasks (different adapters, guidance on and off) in ONE forward give
    each row what its own teacher's forward gives (fp32: batch-shape re-association only). SD3:
    CFG rows and cond-only rows mixed; FLUX (guidance embedded): one scale per forward."""
    pol = tiny_family.build(teachers=[dict(name="gen", path=tiny_family.teachers["peft"]),
                                                  dict(name="ocr", path=tiny_family.teachers["diffusers"])])
    _perturb_student(pol)
    embeds = random_embeds(pol, n=5, seed=3)
    x = torch.randn(5, *pol.latent_shape(64), generator=torch.Generator().manual_seed(4))
    adapters = ["gen", "ocr", "gen", BASE, "ocr"]
    cfg_family = tiny_family.family in ("sd3", "qwen_image", "wan")  # guidance is CFG: rows with and without
    scales = [1.0, 4.5, 1.0, 4.5, 4.5] if cfg_family else [tiny_family.guidance] * 5
    sigma = torch.tensor([0.9, 0.9, 0.5, 0.5, 0.2])
    forwards = []
    pol.transformer.register_forward_hook(lambda *a: forwards.append(1))
    mixed = pol.velocity_mixed(x, sigma, embeds, adapters, scales)
    assert len(forwards) == 1  # one transformer forward for every row
    with torch.no_grad():
        for i in range(5):
            ref = pol.velocity(x[i:i + 1], sigma[i:i + 1], embeds.select([i]), adapters[i], scales[i])
            torch.testing.assert_close(mixed[i:i + 1], ref, rtol=1e-5, atol=1e-5)
    # the switch state is untouched: the student is active again and trainable
    assert all(layer.active_adapters == [STUDENT] and not layer.disable_adapters for layer in pol._switch.layers)
    assert all(layer._opd_spans is None for layer in pol._switch.layers)


def test_merged_teachers_match_adapter_teachers_and_print_their_memory(tiny_family, capsys):
    """Teacher fast path: each LoRA teacher merged into its own copy of the weights it adapts
    predicts what the adapter predicts (W + sBA vs Wx + sB(Ax): fp32 rounding only), alone and
    mixed with the other teacher in ONE forward; its cost is printed: exactly one extra weight
    per adapted layer, not a backbone copy."""
    teachers = [dict(name="gen", path=tiny_family.teachers["peft"]), dict(name="ocr", path=tiny_family.teachers["diffusers"])]
    adapters = tiny_family.build(teachers=teachers)
    merged = tiny_family.build(teachers=teachers, merge_teachers=True)
    printed = capsys.readouterr().out
    for name in ("gen", "ocr"):
        layers = [m for m in adapters._switch.layers if name in m.lora_A]
        assert layers and merged.merged_teacher_bytes[name] == sum(
            m.base_layer.weight.numel() * m.base_layer.weight.element_size() for m in layers)
    total = sum(merged.merged_teacher_bytes.values())
    assert "2 merged teachers (gen, ocr)" in printed and f"+{total / 1e9:.2f} GB in all" in printed
    assert not merged._full_teachers  # no backbone copies
    assert not any(".gen." in n or ".ocr." in n for n, _ in merged.transformer.named_parameters())
    forwards = []
    merged.transformer.register_forward_hook(lambda *a: forwards.append(1))
    embeds = random_embeds(merged, seed=5)
    x = torch.randn(3, *merged.latent_shape(64), generator=torch.Generator().manual_seed(6))
    g = tiny_family.guidance
    with torch.no_grad():
        for name, scale in (("gen", 1.0), ("ocr", g)):
            torch.testing.assert_close(merged.velocity(x, 0.7, embeds, name, scale),
                                       adapters.velocity(x, 0.7, embeds, name, scale), rtol=1e-4, atol=1e-5)
        rows = (["gen", "ocr", "gen"], [1.0, g, 1.0])
        forwards.clear()
        torch.testing.assert_close(merged.velocity_mixed(x, 0.7, embeds, *rows),
                                   adapters.velocity_mixed(x, 0.7, embeds, *rows), rtol=1e-4, atol=1e-5)
        assert len(forwards) == (1 if tiny_family.family in ("sd3", "qwen_image", "wan") else 2)  # guidance embedded (FLUX, FLUX.2): one forward per scale


def test_compiled_blocks_do_not_recompile_on_adapter_switches(tiny_sd3_dir, tiny_teacher_dirs, teacher_policy):
    """Regional compilation (backend "eager": dynamo's capture and guards without code
    generation) with the student LoRA under grad and the teachers without: after one warm-up
    pass over every adapter, any order of switches reuses the cached graphs (dynamo's frame and
    graph counters do not move), and outputs and gradients equal the uncompiled policy's."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    pol = build_policy(tiny_sd3_dir, teachers=[dict(name="gen", path=tiny_teacher_dirs["peft"]),
                                               dict(name="ocr", path=tiny_teacher_dirs["diffusers"])])
    _perturb_student(pol)
    assert pol.compile_blocks(backend="eager") == len(pol.transformer.transformer_blocks) == 2
    embeds = random_embeds(pol, seed=7)
    x = torch.randn(3, *pol.latent_shape(64), generator=torch.Generator().manual_seed(8))

    def query(p, adapter):
        if adapter == "mixed":  # rows of two teachers and the base in one forward
            return [p.velocity_mixed(x, 0.6, embeds, ["gen", "ocr", BASE], [4.5, 1.0, 4.5])]
        if adapter == "student_grad":
            for q in p.trainable_parameters():
                q.grad = None
            v = p.velocity(x, 0.6, embeds, STUDENT, 4.5)
            v.square().mean().backward()
            return [v.detach()] + [q.grad.clone() for q in p.trainable_parameters()]
        with torch.no_grad():
            return [p.velocity(x, 0.6, embeds, adapter, 4.5)]

    order = ["student_grad", "gen", "ocr", BASE, "mixed"]
    for adapter in order:  # warm-up: one graph per (adapter / grad mode, block variant)
        query(pol, adapter)
    compiled = (counters["frames"]["ok"], counters["stats"]["unique_graphs"])
    assert compiled[1] >= len(order)
    for adapter in ["ocr", "mixed", "student_grad", BASE, "gen", "mixed", "student_grad", "ocr", "gen"]:
        got, want = query(pol, adapter), query(teacher_policy, adapter)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), adapter
    assert (counters["frames"]["ok"], counters["stats"]["unique_graphs"]) == compiled  # no recompilation
