"""The lean capture path: the model's own modules read hook points with the bridge's values, at the
Python cost of a plain Hugging Face forward."""

import pytest
import torch

from bench import python_calls
from capture import lean_forward, load_model, resolve_model_path, run_bridge_to_hooks, run_to_hooks
from config import SITES, get_default_cfg, site_hook

# hook names that are not site shorthands: a norm's output, an MLP's hidden layer, attention output
FULL_NAMES = ["blocks.1.ln2.hook_out", "blocks.0.mlp.hook_pre", "blocks.1.attn.hook_out"]


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_gpt2_dir):
    return load_model(str(tiny_gpt2_dir), "cpu")


def rows(model, n: int = 3, seq: int = 16) -> torch.Tensor:
    return torch.randint(10, min(2000, model.cfg.d_vocab), (n, seq),
                         generator=torch.Generator().manual_seed(1))


def sites_of(model) -> list[str]:
    return [site_hook(layer, s) for layer in range(model.cfg.n_layers) for s in SITES]


@pytest.mark.parametrize("name", ["minilm", "tiny_gpt2"])
def test_lean_forward_gives_the_bridges_activations_at_every_site(name, request):
    """Every site shorthand and some full hook names, one at a time and several from one forward:
    the values the bridge gives (bitwise on MiniLM, whose bridge runs the HF modules as they are; to
    rounding on GPT-2, whose bridge computes attention itself), read through the lean modules except
    where the bridge computes something else."""
    model = request.getfixturevalue(name)
    lean, tokens = lean_forward(model), rows(model)
    for hook_points in [[h] for h in sites_of(model) + FULL_NAMES] + [sites_of(model)[1::3]]:
        expected = run_bridge_to_hooks(model, tokens, hook_points)
        got = run_to_hooks(model, tokens, hook_points)
        for g, e in zip(got, expected, strict=True):
            if name == "minilm":
                assert torch.equal(g, e), hook_points
            else:
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
        on_lean = lean.agrees[frozenset(hook_points)]
        # BERT's MLP input is fired by a hook the bridge puts on its block: it names the whole layer
        bridge_only = name == "minilm" and any(h.endswith("mlp.hook_in") for h in hook_points)
        assert on_lean != bridge_only, hook_points


def test_a_hook_set_the_lean_modules_get_wrong_is_served_by_the_bridge(minilm):
    """BERT's `mlp.hook_in` names a component around the whole layer, whose input is the residual
    stream: the bridge check catches it; every batch of that hook set comes from the bridge."""
    tokens = rows(minilm)
    lean = lean_forward(minilm)
    hook = "blocks.2.mlp.hook_in"
    wrong = lean.run(tokens, [hook])[0]  # what the lean modules give: the layer's input
    assert torch.equal(wrong, run_bridge_to_hooks(minilm, tokens, ["blocks.2.hook_resid_pre"])[0])
    assert not lean.check(tokens, [hook], run_bridge_to_hooks(minilm, tokens, [hook]))
    assert torch.equal(run_to_hooks(minilm, tokens, [hook])[0],
                       run_bridge_to_hooks(minilm, tokens, [hook])[0])
    scale = run_to_hooks(minilm, tokens, ["blocks.0.ln1.hook_scale"])[0]  # no module to hook
    assert scale.shape == (3, 16, 1) and not lean.agrees[frozenset(["blocks.0.ln1.hook_scale"])]


def test_lean_hooks_stay_off_the_bridge_and_are_removed(minilm):
    """The lean tree's modules are private copies: a lean forward fires none of the bridge's hooks,
    a bridge forward none of the lean's, and no hook is left behind, even if the forward fails."""
    lean, tokens = lean_forward(minilm), rows(minilm)
    hook = "blocks.3.hook_resid_pre"
    run_to_hooks(minilm, tokens, [hook])  # a hook set's first batch runs the bridge too: lean check
    assert lean.agrees[frozenset([hook])]
    fired = []
    minilm.hook_dict[hook].add_hook(lambda act, hook: fired.append("bridge"))
    try:
        run_to_hooks(minilm, tokens, [hook])
        assert not fired
    finally:
        minilm.hook_dict[hook].remove_hooks("fwd")
    module = lean.sites[hook][0]
    assert id(module) not in {id(m) for m in minilm.modules()}
    handle = module.register_forward_pre_hook(lambda *args: fired.append("lean"))
    try:
        run_bridge_to_hooks(minilm, tokens, [hook])
        assert not fired
    finally:
        handle.remove()

    def hooks(modules) -> int:  # HF adds its own hooks on a model's first forward: count, not zero
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)

    before = hooks(minilm.modules()), hooks(lean.root.modules())
    with pytest.raises(IndexError):
        lean.run(tokens + 10**6, [hook])  # token ids past the vocabulary fail inside the model
    lean.run(tokens, [hook])
    assert (hooks(minilm.modules()), hooks(lean.root.modules())) == before


def test_lean_capture_costs_at_most_1_3x_the_python_calls_of_a_plain_forward(minilm):
    """The default hook for one row of 16 tokens vs HF's own model cut at the same depth (cProfile
    call counts, which don't drift with the machine's load; bench.py reports the same figure)."""
    from transformers import AutoModel

    cfg = get_default_cfg()
    hook = site_hook(cfg["layer"], cfg["site"])
    row = rows(minilm, 1)
    plain = AutoModel.from_pretrained(resolve_model_path(minilm.cfg.model_name),
                                      num_hidden_layers=cfg["layer"]).eval()
    with torch.inference_mode():
        plain_calls = python_calls(lambda: plain(input_ids=row))
    capture_calls = python_calls(lambda: run_to_hooks(minilm, row, [hook]))
    bridge_calls = python_calls(lambda: run_bridge_to_hooks(minilm, row, [hook]))
    assert capture_calls <= 1.3 * plain_calls < bridge_calls
