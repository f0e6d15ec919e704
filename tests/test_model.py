import pytest
import torch
import torch.nn.functional as F

from lingua_sweep.config import ModelConfig
from lingua_sweep.errors import UserError
from lingua_sweep.model import (
    ACTIVATIONS,
    NORMS,
    POSEMBEDS,
    build_model,
    count_params,
    flops_per_token,
    register_activation,
)


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(
        **{"dim": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 50, "multiple_of": 16, **overrides}
    )


def test_registries_hold_the_spec_names():
    assert NORMS.names() == ["layernorm", "rmsnorm"]
    assert ACTIVATIONS.names() == ["gelu", "relu", "sigmoid", "silu", "tanh"]
    assert POSEMBEDS.names() == ["none", "rope"]


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("activation", ["silu", "gelu", "relu", "tanh", "sigmoid"])
@pytest.mark.parametrize("posembed", ["rope", "none"])
def test_every_combination_gives_logits_and_a_finite_loss(norm, activation, posembed):
    model = build_model(tiny(norm=norm, activation=activation, posembed=posembed))
    model.init_weights(0)
    tokens = torch.randint(0, 50, (2, 12))
    assert model(tokens).shape == (2, 12, 50)
    loss = model(tokens, tokens)
    assert torch.isfinite(loss)
    # Small init: the initial loss is close to uniform over the vocabulary.
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5


def test_model_is_causal():
    model = build_model(tiny())
    model.init_weights(0)
    tokens = torch.randint(0, 50, (1, 10))
    changed = tokens.clone()
    changed[0, 7] = (changed[0, 7] + 1) % 50
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[0, :7], b[0, :7])
    assert not torch.allclose(a[0, 7:], b[0, 7:])


def test_only_rope_lets_attention_see_the_order_of_the_prefix():
    # Attention without positions is invariant to permuting the keys: swapping the first two
    # tokens leaves the last position's output unchanged, unless rope encodes positions.
    for posembed in ["rope", "none"]:
        model = build_model(tiny(posembed=posembed, n_layers=1))
        model.init_weights(0)
        a = model(torch.tensor([[1, 2, 3, 4, 5]]))[0, -1]
        b = model(torch.tensor([[2, 1, 3, 4, 5]]))[0, -1]
        assert torch.allclose(a, b, atol=1e-6) == (posembed == "none")


def test_init_is_deterministic_per_seed():
    a, b, c = (build_model(tiny()) for _ in range(3))
    a.init_weights(1), b.init_weights(1), c.init_weights(2)
    for (name, pa), pb, pc in zip(
        a.named_parameters(), b.parameters(), c.parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if pa.ndim > 1:
            assert not torch.equal(pa, pc), name


def test_user_registered_activation_is_used():
    @register_activation("test_square")
    def square(x):
        return x * x

    cfg = tiny(activation="test_square")
    model = build_model(cfg)
    ff = model.layers["0"].feed_forward
    x = torch.randn(3, cfg.dim)
    torch.testing.assert_close(ff(x), ff.w2(ff.w1(x) ** 2 * ff.w3(x)))


def test_unknown_names_fail_with_the_registered_list():
    with pytest.raises(UserError, match="unknown norm 'batchnorm'; registered: layernorm, rmsnorm"):
        build_model(tiny(norm="batchnorm"))
    with pytest.raises(UserError, match="not divisible"):
        build_model(tiny(dim=30))


def test_loss_equals_cross_entropy_of_logits():
    model = build_model(tiny())
    model.init_weights(0)
    tokens, targets = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))
    expected = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(model(tokens, targets), expected)


def test_flops_per_token_counts_matmul_params_and_attention():
    cfg = tiny()
    model = build_model(cfg)
    matmul_params = count_params(model) - sum(
        p.numel() for n, p in model.named_parameters() if p.ndim == 1
    )
    assert flops_per_token(cfg, seq_len=12) == 6 * matmul_params + 12 * 2 * 32 * 12


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_heads": 0}, "model.n_heads=0 must be at least 1"),
        ({"n_kv_heads": 3}, "model.n_kv_heads=3 must divide model.n_heads=4"),
        ({"dim": 36}, r"36/4=9 is odd"),  # RoPE rotates halves: an odd head dim can't be split
        ({"dim": 30}, "model.dim=30 is not divisible by model.n_heads=4"),
    ],
)
def test_impossible_shapes_fail_at_build_not_at_the_first_forward(overrides, message):
    with pytest.raises(UserError, match=message):
        build_model(tiny(**overrides))


def test_an_odd_head_dim_is_fine_without_rope():
    model = build_model(tiny(dim=36, posembed="none"))
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 50)


def test_grouped_query_attention_builds_and_runs():
    model = build_model(tiny(n_kv_heads=2))
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 50)
