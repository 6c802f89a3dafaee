"""engine.advantages against hand-computed values and an independent float64 reference (loops over
groups, statistics written out by hand rather than torch.std)."""
import math

import pytest
import torch

from r1_engine.engine.advantages import filter_uniform_groups, group_advantages, overlong_penalty


def reference_advantages(rewards, G, scale, estimator, unbiased=True, eps=1e-6):
    """Plain-Python float64 reference, one group at a time."""
    values = [float(r) for r in rewards.reshape(-1)]
    groups = [values[i:i + G] for i in range(0, len(values), G)]

    def std(xs):
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - (1 if unbiased else 0)))

    batch_std = std(values)
    out = []
    for g in groups:
        if max(g) == min(g):
            out += [0.0] * G
            continue
        mean = sum(g) / G
        for i, r in enumerate(g):
            a = r - mean if estimator == "grpo" else r - (sum(g) - r) / (G - 1)
            if scale == "group":
                a /= std(g) + eps
            elif scale == "batch":
                a /= batch_std + eps
            out.append(a)
    return torch.tensor(out, dtype=torch.float64)


def test_hand_computed_grpo():
    # Group 1: rewards 1, 0, 0, 1 -> mean 0.5, unbiased std sqrt(1/3) = 0.57735
    # Group 2: all equal -> 0
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    a = group_advantages(rewards, 4)
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    torch.testing.assert_close(a, torch.tensor([expected, -expected, -expected, expected, 0, 0, 0, 0]))
    # population std: 0.5 -> A = +-1 (up to eps)
    b = group_advantages(rewards, 4, unbiased=False)
    torch.testing.assert_close(b[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]) / (1 + 2e-6))
    # Dr. GRPO: no std division
    torch.testing.assert_close(group_advantages(rewards, 4, scale="none"),
                               torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_hand_computed_rloo():
    # Group 3, 0, 0: baselines (0+0)/2 = 0, (3+0)/2 = 1.5, 1.5 -> A = 3, -1.5, -1.5
    a = group_advantages(torch.tensor([3.0, 0.0, 0.0]), 3, estimator="rloo")
    torch.testing.assert_close(a, torch.tensor([3.0, -1.5, -1.5]))


@pytest.mark.parametrize("estimator, scale", [("grpo", "group"), ("grpo", "none"), ("grpo", "batch"),
                                              ("rloo", "none"), ("rloo", "group")])
@pytest.mark.parametrize("unbiased", [True, False])
def test_against_float64_reference(estimator, scale, unbiased):
    g = torch.Generator().manual_seed(0)
    G = 8
    rewards = torch.randint(0, 3, (16, G), generator=g).float() * 0.5 + torch.rand(16, 1, generator=g)
    rewards[3] = 1.0  # a uniform group
    rewards[5, :4] = 0.0
    rewards[5, 4:] = 1.0
    out = group_advantages(rewards.reshape(-1), G, scale=scale, estimator=estimator, unbiased=unbiased)
    assert out.shape == (16 * G,) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference_advantages(rewards, G, scale, estimator, unbiased),
                               atol=1e-6, rtol=1e-6)
    # The 2-D layout gives the same numbers in the same shape.
    out_2d = group_advantages(rewards, G, scale=scale, estimator=estimator, unbiased=unbiased)
    assert out_2d.shape == (16, G)
    torch.testing.assert_close(out_2d.reshape(-1), out, atol=0, rtol=0)


def test_uniform_groups_are_exactly_zero():
    # 0.1 * 3 / 3 is not 0.1 in floating point; the advantage must still be exactly 0.
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], dtype=torch.float64)
    for estimator in ("grpo", "rloo"):
        for scale in ("group", "none", "batch"):
            a = group_advantages(rewards, 3, scale=scale, estimator=estimator)
            assert (a == 0).all() and a.dtype == torch.float64
    assert (group_advantages(torch.tensor([1.0, 0.0, 1.0]), 1) == 0).all()  # groups of one


def test_default_scale_depends_on_estimator():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(rewards, 4, estimator="rloo"),
                               torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))


def test_integer_and_bool_rewards_give_float32():
    a = group_advantages(torch.tensor([1, 0, 1, 1]), 2, scale="none")
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, torch.tensor([0.5, -0.5, 0.0, 0.0]))


def test_bad_inputs():
    with pytest.raises(ValueError, match="whole number of groups"):
        group_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError, match="group_size=4 columns"):
        group_advantages(torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match="NaN/inf at completion indices \\[2\\]"):
        group_advantages(torch.tensor([0.0, 1.0, float("nan"), 1.0]), 2)
    with pytest.raises(ValueError, match="unknown advantage scale 'std'"):
        group_advantages(torch.zeros(4), 2, scale="std")
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        group_advantages(torch.zeros(4), 2, estimator="ppo")
    with pytest.raises(ValueError, match="RLOO needs group_size >= 2"):
        group_advantages(torch.zeros(4), 1, estimator="rloo")


def test_filter_uniform_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.3, 0.3])
    assert filter_uniform_groups(rewards, 2).tolist() == [False, True, False, False]
    assert filter_uniform_groups(rewards, 4).tolist() == [True, True]


def test_overlong_penalty_matches_the_dapo_formula():
    # L_max = 20, L_c = 4: no penalty up to 16, linear to -1 at 20, -1 beyond.
    lengths = torch.tensor([0, 10, 16, 17, 18, 20, 21, 100])
    expected = torch.tensor([0.0, 0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0])
    torch.testing.assert_close(overlong_penalty(lengths, max_len=20, cache_len=4), expected)
    torch.testing.assert_close(overlong_penalty([17, 3], 20, 4), torch.tensor([-0.25, 0.0]))
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(lengths, max_len=20, cache_len=0)
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(lengths, max_len=4, cache_len=5)
