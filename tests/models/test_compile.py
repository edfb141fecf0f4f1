"""Regional compilation on a 4-block tiny SD3.5 (every block variant of SD3.5-Medium: dual
attention, plain, and the last, context_pre_only block) and on the tiny FLUX: no graph break
inside a block (they compile with fullgraph=True, so a break would be an error), and after one
warm-up pass over every kind of forward a round makes (student with and without grad, each
teacher, the base, mixed-teacher batches, per-task and lockstep row counts) nothing compiles
again, whatever the order. Backend "eager": dynamo's capture and guards without code generation
(what decides graphs and recompiles); outputs and gradients equal the uncompiled policy's."""
import pytest
import torch
from torch._dynamo.utils import counters

from diffusion_opd.models import BASE, STUDENT, PromptEmbeds, build_policy
from diffusion_opd.models.specs import DEFAULT_LORA_TARGETS
from diffusion_opd.models.tiny import TINY_SD35_TRANSFORMER_CONFIG, build_tiny_sd3, write_random_teacher_lora

pytestmark = pytest.mark.slow  # dynamo traces ~80 graphs: minutes on a loaded 2-core machine


@pytest.fixture(scope="module")
def sd35(tmp_path_factory):
    """The 4-block tiny SD3.5 and two teachers on every default LoRA target (attention and text
    projections), as the SD3.5-M benchmark loads them."""
    root = tmp_path_factory.mktemp("tiny_sd35")
    folder = build_tiny_sd3(str(root / "pipeline"), seed=0, transformer_config=TINY_SD35_TRANSFORMER_CONFIG)
    teachers = [dict(name=name, path=write_random_teacher_lora(folder, str(root / name), seed=i + 1, scale=0.5,
                                                               target_modules=DEFAULT_LORA_TARGETS["sd3"]))
                for i, name in enumerate(("gen", "ocr"))]
    return folder, teachers


def embeds_for(pol, n, seed):
    cfg, gen = pol.transformer.config, torch.Generator().manual_seed(seed)

    def draw(rows):
        return {"prompt_embeds": torch.randn(rows, 12, cfg.joint_attention_dim, generator=gen),
                "pooled_prompt_embeds": torch.randn(rows, cfg.pooled_projection_dim, generator=gen)}

    return PromptEmbeds([f"p{i}" for i in range(n)], draw(n), draw(1))


def queries(pol, n):
    """Every kind of forward of a round at batch size n (3: one task; 6: two tasks in lockstep)."""
    embeds = embeds_for(pol, n, seed=n)
    x = torch.randn(n, *pol.latent_shape(64), generator=torch.Generator().manual_seed(n))
    half = n // 2

    def student_grad():
        for q in pol.trainable_parameters():
            q.grad = None
        v = pol.velocity(x, 0.6, embeds, STUDENT, 4.5)
        v.square().mean().backward()
        return [v.detach()] + [q.grad.clone() for q in pol.trainable_parameters()]

    def no_grad(adapter, scale):
        def run():
            with torch.no_grad():
                return [pol.velocity(x, 0.6, embeds, adapter, scale)]
        return run

    def mixed():  # a lockstep teacher batch: each teacher's rows, one with CFG, one without
        return [pol.velocity_mixed(x, 0.6, embeds, ["gen"] * half + ["ocr"] * (n - half),
                                   [1.0] * half + [4.5] * (n - half))]

    return {"student_grad": student_grad, "student": no_grad(STUDENT, 4.5), "gen": no_grad("gen", 1.0),
            "ocr": no_grad("ocr", 4.5), "base": no_grad(BASE, 4.5), "mixed": mixed}


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def compiled_state():
    """(graphs compiled, graph breaks): a recompilation compiles a new graph."""
    return counters["stats"]["unique_graphs"], graph_breaks()


@pytest.mark.parametrize("merge", [False, True], ids=["adapters", "merged"])
def test_sd35_blocks_compile_whole_and_never_recompile_after_warm_up(sd35, merge):
    folder, teachers = sd35
    torch._dynamo.reset()
    counters.clear()
    eager = build_policy(folder, teachers=teachers, merge_teachers=merge)
    pol = build_policy(folder, teachers=teachers, merge_teachers=merge)
    blocks = pol.transformer.transformer_blocks
    assert [b.attn2 is not None for b in blocks] == [True, True, False, False]
    assert [b.context_pre_only for b in blocks] == [False, False, False, True]
    for p in (eager, pol):
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for q in p.trainable_parameters():
                q.copy_(torch.randn(q.shape, generator=gen) * 0.1)
    assert pol.compile_blocks(backend="eager") == 4
    kinds = {n: queries(pol, n) for n in (3, 6)}
    for n, fns in kinds.items():  # warm-up: every kind at both row counts
        for fn in fns.values():
            fn()
    warm = compiled_state()
    print(f"after warm-up: unique graphs {warm[0]}, graph breaks {warm[1]}")
    assert warm[1] == 0 and warm[0] > 0
    reference = {n: queries(eager, n) for n in (3, 6)}
    for n, name in [(6, "mixed"), (3, "student_grad"), (6, "gen"), (3, "base"), (6, "student_grad"), (3, "mixed"),
                    (6, "ocr"), (3, "student"), (6, "base"), (3, "gen")]:
        got, want = kinds[n][name](), reference[n][name]()
        assert all(torch.equal(a, b) for a, b in zip(got, want)), (n, name)
    assert compiled_state() == warm  # no recompilation, no new graph, no break


def test_flux_blocks_compile_whole(tiny_flux_dir, tiny_flux_teacher_dirs):
    """The FLUX blocks (double- and single-stream) and the modules around them have no graph
    break either (fullgraph=True would raise), for the student with grad and a teacher."""
    torch._dynamo.reset()
    counters.clear()
    pol = build_policy(tiny_flux_dir, teachers=[dict(name="gen", path=tiny_flux_teacher_dirs["peft"])])
    assert pol.compile_blocks(backend="eager") == 3
    embeds = embeds_for(pol, 2, seed=1)
    x = torch.randn(2, *pol.latent_shape(64), generator=torch.Generator().manual_seed(2))
    pol.velocity(x, 0.6, embeds, STUDENT, 3.5).square().mean().backward()
    with torch.no_grad():
        pol.velocity(x, 0.6, embeds, "gen", 3.5)
    assert counters["stats"]["unique_graphs"] > 0 and graph_breaks() == 0
