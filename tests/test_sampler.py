"""Sampler functions (spec §C.1-§C.5): hand-made cases, and the transformers 5.23.0 sampler
pieces (temperature processor, EntropyBoundSampler, StableAndConfidentStoppingCriteria,
Categorical entropy) as oracles on random logits."""
from __future__ import annotations

from collections import deque
from types import SimpleNamespace

import pytest
import torch

from diffcli.errors import InputError
from diffcli.generation.sampler import (SamplerConfig, entropy_bound_accept, is_stable, renoise,
                             should_stop, temperature_at, token_entropy, trim_cli, trim_eos_pad)

hfgen = pytest.importorskip("transformers.models.diffusion_gemma.generation_diffusion_gemma")


# --- temperature schedule -------------------------------------------------------------------

def test_temperature_schedule_values():
    assert temperature_at(48, 48, 0.4, 0.8) == pytest.approx(0.8, abs=1e-7)
    assert temperature_at(1, 48, 0.4, 0.8) == pytest.approx(0.40833, abs=1e-5)
    assert temperature_at(1, 48, 0.4, 0.8) == pytest.approx(0.4 + 0.4 / 48, abs=1e-7)
    assert temperature_at(24, 48, 0.4, 0.8) == pytest.approx(0.6, abs=1e-7)
    assert temperature_at(1, 1, 0.4, 0.8) == pytest.approx(0.8, abs=1e-7)


@pytest.mark.parametrize("S", [1, 7, 8, 48])
def test_tempered_logits_bitwise_equal_transformers(S):
    raw = torch.randn(16, 64, generator=torch.Generator().manual_seed(S)) * 20
    proc = hfgen.LinearTemperatureScheduleLogitsProcessor(t_min=0.4, t_max=0.8, max_denoising_steps=S)
    for s in range(S, 0, -1):
        ref = proc(None, raw, torch.tensor(s, dtype=torch.int32))
        assert torch.equal(raw / temperature_at(s, S, 0.4, 0.8), ref), (S, s)


# --- entropy --------------------------------------------------------------------------------

def test_token_entropy_hand_made():
    V = 50
    logits = torch.zeros(3, V)
    logits[1, 7] = 1e4                       # one certain position
    logits[2, 10:] = float("-inf")          # uniform over the first 10 tokens
    h = token_entropy(logits)
    assert h.dtype == torch.float32 and h.shape == (3,)
    torch.testing.assert_close(h, torch.tensor([torch.log(torch.tensor(50.0)), 0.0,
                                                torch.log(torch.tensor(10.0))]))


def test_token_entropy_matches_categorical():
    logits = torch.randn(32, 300, generator=torch.Generator().manual_seed(0)) * 8
    ref = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(token_entropy(logits), ref, rtol=0, atol=2e-6)
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(token_entropy(logits, probs), ref, rtol=0, atol=2e-6)


# --- entropy-bound acceptance ----------------------------------------------------------------

def accept(values, bound):
    return entropy_bound_accept(torch.tensor(values, dtype=torch.float32), bound).tolist()


def test_accept_all_positions():
    assert accept([0.0, 0.0, 0.0, 0.0], 0.1) == [True] * 4
    assert accept([3.0, 1.0, 2.0], 10.0) == [True] * 3


def test_accept_single_position():
    assert accept([3.0, 1.0, 2.0], 0.5) == [False, True, False]
    assert accept([5.0], 0.0) == [True]


def test_accept_bound_zero_and_inclusive_edge():
    # bound 0: the lowest always passes, then only positions after zero-entropy ones
    assert accept([0.0, 0.3, 0.0, 0.2], 0.0) == [True, False, True, True]
    assert accept([0.4, 0.3, 0.2], 0.0) == [False, False, True]
    # the sum *excluding* the position is compared with <=: exactly the bound passes
    assert accept([0.25, 1.0, 0.25], 0.5) == [True, True, True]
    assert accept([0.25, 1.0, 0.25], 0.49) == [True, False, True]


def test_accept_ties_go_to_the_lowest_index():
    assert accept([0.5, 0.5, 0.5], 0.1) == [True, False, False]
    assert accept([0.7, 0.5, 0.9, 0.5], 0.1) == [False, True, False, False]
    assert accept([0.7, 0.5, 0.9, 0.5], 0.5) == [False, True, False, True]


def test_accept_matches_transformers_sampler():
    sampler = hfgen.EntropyBoundSampler(hfgen.EntropyBoundSamplerConfig(0.1), canvas_length=24,
                                        vocab_size=40, max_denoising_steps=8)
    g = torch.Generator().manual_seed(1)
    n_accepted = set()
    for trial in range(40):
        # spread of confidence so the bound lands at different ranks
        logits = torch.randn(1, 24, 40, generator=g) * torch.rand(1, 24, 1, generator=g) * 60
        current = torch.zeros(1, 24, dtype=torch.long)
        sampler.accept_canvas(current, current + 1, logits, 1)
        ours = entropy_bound_accept(token_entropy(logits[0]), 0.1)
        assert torch.equal(ours, sampler.accepted_token_mask[0]), trial
        n_accepted.add(int(ours.sum()))
    assert len(n_accepted) > 3          # the comparison covered several acceptance counts


def test_renoise_replaces_every_rejected_position():
    sampled = torch.tensor([10, 11, 12, 13])
    noise = torch.tensor([90, 91, 92, 93])
    accepted = torch.tensor([True, False, False, True])
    assert renoise(sampled, accepted, noise).tolist() == [10, 91, 92, 13]


# --- stopping -------------------------------------------------------------------------------

def test_is_stable_cases():
    a, b = torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4])
    assert is_stable(deque(), a, 0)
    assert not is_stable(deque(), a, 1)             # first step is never stable
    assert is_stable(deque([b, a]), a, 1)
    assert not is_stable(deque([b, a]), a, 2)
    assert is_stable(deque([b, a, a]), a, 2)


def test_should_stop_is_strict_and_needs_stability():
    h = torch.tensor([0.0, 0.01], dtype=torch.float32)          # mean 0.005
    assert not should_stop(True, h, 0.005)
    assert should_stop(True, h, 0.0051)
    assert not should_stop(False, h, 1.0)


@pytest.mark.parametrize("stability", [0, 1, 2])
def test_stop_decisions_match_transformers(stability):
    crit = hfgen.StableAndConfidentStoppingCriteria(stability_threshold=stability,
                                                    confidence_threshold=0.05)
    g = torch.Generator().manual_seed(stability)
    history: deque = deque(maxlen=max(stability, 1))
    base = torch.randn(6, 30, generator=g)
    decisions = []
    for step in range(16):
        # sharpen over time, argmax changes only on some steps
        logits = base * (1 + 40 * step)
        if step in (2, 3, 7):
            logits = logits + torch.randn(6, 30, generator=g) * 50
        am = logits.argmax(-1)
        ref = bool(crit(am[None], logits[None])[0])
        stable = is_stable(history, am, stability)
        history.append(am)
        ours = should_stop(stable, token_entropy(logits), 0.05)
        assert ours == ref, step
        decisions.append(ours)
    assert True in decisions and False in decisions


# --- trimming -------------------------------------------------------------------------------

def t(values):
    return torch.tensor(values, dtype=torch.long)


def test_eos_pad_at_first_and_last_position():
    out, ended = trim_eos_pad(t([1, 5, 6, 1]), [1], 0)
    assert ended and out.tolist() == [1, 0, 0, 0]
    out, ended = trim_eos_pad(t([5, 6, 7, 1]), [1], 0)
    assert ended and out.tolist() == [5, 6, 7, 1]
    out, ended = trim_eos_pad(t([5, 106, 7, 1]), [1, 106], 0)
    assert ended and out.tolist() == [5, 106, 0, 0]
    out, ended = trim_eos_pad(t([5, 6, 7, 8]), [1], 0)
    assert not ended and out.tolist() == [5, 6, 7, 8]


def test_cli_cut_at_eog_first_and_last_position():
    assert trim_cli(t([106, 5, 6, 7]), [1, 106, 50]) == (0, "eog")
    assert trim_cli(t([5, 6, 7, 50]), [1, 106, 50]) == (3, "eog")
    assert trim_cli(t([5, 6, 7, 8]), [1, 106, 50]) == (4, None)


def test_cli_cut_repetition_stride_1():
    run7 = [9, 8] + [3] * 7 + [4, 5]          # 6 equal neighbours from index 2
    assert trim_cli(t(run7), [1]) == (2, "repetition")
    run6 = [9, 8] + [3] * 6 + [4, 5]          # only 5 equal neighbours: kept
    assert trim_cli(t(run6), [1]) == (10, None)


def test_cli_cut_repetition_stride_2():
    loop = [9, 7, 8] + [3, 4] * 4 + [5]       # period-2 run of 8 tokens from index 3
    assert trim_cli(t(loop), [1]) == (3, "repetition")
    short = [9, 7, 8] + [3, 4] * 3 + [3, 5]   # 7 tokens: only 5 pairs
    assert trim_cli(t(short), [1]) == (len(short), None)
    commas = [44, 10, 44, 11, 44, 12, 44, 13, 44, 14, 44, 15]    # ", a, b, c ..." is no loop
    assert trim_cli(t(commas), [1]) == (len(commas), None)


def test_cli_cut_eog_versus_repetition():
    assert trim_cli(t([5, 1] + [3] * 8), [1]) == (1, "eog")           # loop after the EOG
    assert trim_cli(t([5] + [3] * 8 + [1]), [1]) == (1, "repetition")  # loop before it
    assert trim_cli(t([5] + [3] * 6 + [1, 3]), [1]) == (7, "eog")     # loop would cross the EOG


# --- config ---------------------------------------------------------------------------------

def test_sampler_config_defaults():
    s = SamplerConfig()
    assert (s.max_steps, s.t_max, s.t_min, s.entropy_bound, s.stability, s.confidence) == \
        (48, 0.8, 0.4, 0.1, 1, 0.005)


def test_sampler_config_precedence():
    model_cfg = SimpleNamespace(sampler_defaults={"max_steps": 20, "t_min": 0.3, "t_max": 0.8,
                                                  "entropy_bound": 0.2, "stability": 1,
                                                  "confidence": 0.005})
    s = SamplerConfig.resolve(model_cfg, max_steps=12, t_min=None)
    assert s.max_steps == 12 and s.t_min == 0.3 and s.entropy_bound == 0.2
    assert SamplerConfig.resolve(None) == SamplerConfig()
    assert SamplerConfig.resolve(SimpleNamespace()).max_steps == 48


@pytest.mark.parametrize("kw", [dict(t_min=0.9), dict(max_steps=0), dict(entropy_bound=-1.0),
                                dict(stability=-1), dict(t_max=0.0, t_min=0.0),
                                dict(confidence=float("nan")), dict(max_steps=2.5)])
def test_sampler_config_rejects_bad_values(kw):
    with pytest.raises(InputError) as err:
        SamplerConfig.resolve(None, **kw)
    assert "\n" not in err.value.message and err.value.exit_code == 2


def test_sampler_config_rejects_unknown_setting():
    with pytest.raises(InputError, match="unknown sampler setting"):
        SamplerConfig.resolve(None, temperature=1.0)


@pytest.mark.parametrize("path", ["default", "torch"])
@pytest.mark.parametrize("C,V,scale", [(256, 4096, 3.0), (7, 1000, 0.1), (33, 300, 30.0), (1, 2, 1.0)])
def test_sample_is_torch_multinomial(C, V, scale, path, monkeypatch):
    """sample() draws exactly torch.multinomial's tokens and leaves the generator where it would:
    peaked and flat distributions, exact zeros included, over several seeds in a row; both with
    the native library where it is built ("default") and on the torch-only path."""
    from diffcli.compute import draws
    from diffcli.generation.sampler import sample
    if path == "torch":
        monkeypatch.setattr(draws, "sample", lambda probs, gen: None)
    data = torch.Generator().manual_seed(C * V)
    mine, theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(4):
        probs = torch.softmax(torch.randn(C, V, generator=data) * scale, dim=-1)
        probs[:, : V // 3] = 0.0                      # impossible tokens must never be drawn
        got = sample(probs, mine)
        want = torch.multinomial(probs, 1, generator=theirs).view(C)
        assert got.dtype == torch.long and torch.equal(got, want)
        assert (got >= V // 3).all()
        assert torch.equal(mine.get_state(), theirs.get_state())
