"""The family-agnostic pieces: Conditioning (batched named tensors) and the two noise processes."""

from __future__ import annotations

import pytest
import torch

from cleandift.backbones.conditioning import HIDDEN_STATES, Conditioning
from cleandift.backbones.noise import RectifiedFlow, VariancePreserving


def _cond(b=3):
    return Conditioning({HIDDEN_STATES: torch.arange(b * 2 * 4, dtype=torch.float32).view(b, 2, 4),
                         "encoder_attention_mask": torch.tensor([[1, 0]] * b, dtype=torch.long)})


def test_conditioning_slices_repeats_and_casts_floats_only():
    cond = _cond()
    assert cond.batch_size == 3 and set(cond) == {HIDDEN_STATES, "encoder_attention_mask"}
    assert torch.equal(cond[1:].hidden_states, cond.hidden_states[1:])
    picked = cond[torch.tensor([2, 0, 2])]
    assert torch.equal(picked.hidden_states[0], cond.hidden_states[2]) and picked.batch_size == 3
    rep = cond.repeat_interleave(2)
    assert torch.equal(rep.hidden_states[1], cond.hidden_states[0]) and torch.equal(rep.hidden_states[2],
                                                                                    cond.hidden_states[1])
    half = cond.to(dtype=torch.float16)
    assert half.hidden_states.dtype == torch.float16 and half["encoder_attention_mask"].dtype == torch.long
    assert torch.equal(Conditioning.stack(cond.rows()).hidden_states, cond.hidden_states)
    with pytest.raises(ValueError, match="batch size"):
        Conditioning({HIDDEN_STATES: torch.zeros(2, 1, 1), "x": torch.zeros(3)})
    with pytest.raises(ValueError, match="dim=0"):
        cond.repeat_interleave(2, dim=1)


def test_variance_preserving_is_ddpm_on_alphas_cumprod():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    vp = VariancePreserving(sched)
    x0, eps, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([0, 999])
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(vp.add_noise(x0, eps, t), abar.sqrt() * x0 + (1 - abar).sqrt() * eps, rtol=0, atol=0)
    torch.testing.assert_close(vp.add_noise(x0, eps, t), sched.add_noise(x0, eps, t))
    assert torch.equal(vp.model_timestep(t), t)
    assert float(vp.sigma(torch.tensor(0))) == pytest.approx(0.0292, abs=1e-4)  # SD's betas: noise even at t = 0


def test_static_shift_flow_matches_the_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow = RectifiedFlow(sched, timestep_scale=1000)
    t = torch.tensor([0.0, 250.0, 500.0, 999.0])
    s = t / 1000
    expected = 3 * s / (1 + 2 * s)  # hand-computed shift
    torch.testing.assert_close(flow.sigma(t), expected)
    assert float(flow.sigma(torch.tensor(0.0))) == 0.0
    torch.testing.assert_close(flow.model_timestep(t), expected * 1000)
    x0, eps = torch.randn(4, 2, 2, 2), torch.randn(4, 2, 2, 2)
    xt = flow.add_noise(x0, eps, t)
    assert torch.equal(xt[0], x0[0])  # t = 0 is exactly the clean latent
    # the scheduler's own schedule and noising: it shifts the unshifted sigmas s itself
    sched.set_timesteps(sigmas=s[1:].tolist())
    torch.testing.assert_close(sched.sigmas[:3], expected[1:])
    ref = torch.stack([sched.scale_noise(x0[k:k + 1], sched.timesteps[k - 1:k], eps[k:k + 1])[0] for k in (1, 2, 3)])
    torch.testing.assert_close(xt[1:], ref, rtol=1e-5, atol=1e-6)


def test_learned_student_timestep_gets_a_gradient_through_sigma():
    from diffusers import FlowMatchEulerDiscreteScheduler

    flow = RectifiedFlow(FlowMatchEulerDiscreteScheduler(shift=3.0), timestep_scale=1000)
    t = torch.tensor(261.0, requires_grad=True)
    flow.model_timestep(t).backward()
    s = 0.261
    assert float(t.grad) == pytest.approx(3 / (1 + 2 * s) ** 2, rel=1e-4)  # d/dt [1000 * 3s/(1+2s)], s = t/1000
