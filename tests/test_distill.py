"""FeatureAligner: the CleanDIFT training forward on the tiny SD-structured backbone."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from cleandift.checkpoints import read_checkpoint
from cleandift.distill import FeatureAligner
from cleandift.errors import CheckpointMismatchError, ConfigError
from cleandift.heads import HeadConfig, ProjectionHeads
from cleandift.timesteps import bin_edges


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(3)
    return torch.rand(2, 3, 64, 64, generator=g) * 2 - 1  # 64 px = the tiny model's smallest valid size


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_state_dict_has_reference_layout_without_frozen_parts(tiny_backbone):
    aligner = FeatureAligner(tiny_backbone)
    prefixes = {k.split(".")[0] for k in aligner.state_dict()}
    assert prefixes == {"unet_feature_extractor_cleandift", "adapters", "mapping", "time_in_proj", "time_emb",
                        "timestep"}
    assert set(aligner.adapters) == set(tiny_backbone.taps.default)
    assert aligner.timestep.item() == 261.0 and aligner.timestep.requires_grad
    full = aligner.reference_state_dict()
    assert any(k.startswith("unet_feature_extractor_base.") for k in full)
    assert FeatureAligner(tiny_backbone, student_timestep="fixed").timestep.requires_grad is False


def test_step0_loss_with_heads_equals_no_head_loss(tiny_backbone, images):
    with_heads = FeatureAligner(tiny_backbone)
    without = FeatureAligner(tiny_backbone, use_heads=False)
    a = with_heads(images, ["a cat", "a dog"], generator=_gen())
    b = without(images, ["a cat", "a dog"], generator=_gen())
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=1e-6)
    assert list(a.per_tap) == with_heads.tap_names


def test_film_heads_also_start_at_the_no_head_loss(tiny_backbone, images):
    film = FeatureAligner(tiny_backbone, head_config=HeadConfig(head_norm="film"), taps="us6,us10")
    plain = FeatureAligner(tiny_backbone, use_heads=False, taps="us6,us10")
    torch.testing.assert_close(film(images, generator=_gen(1)).loss, plain(images, generator=_gen(1)).loss,
                               rtol=0, atol=1e-6)


def test_timesteps_are_stratified_per_image(tiny_backbone, images):
    aligner = FeatureAligner(tiny_backbone, taps="mid", num_timesteps=4, use_heads=False)
    for seed in range(5):
        t = aligner(images, generator=_gen(seed)).t
        assert t.shape == (2, 4)
        for i, (lo, hi) in enumerate(bin_edges(4, 1, 999)):
            assert ((t[:, i] >= math.floor(lo)) & (t[:, i] < hi)).all(), (i, t[:, i])


def test_student_runs_once_per_image_teacher_once_per_timestep(tiny_backbone, images):
    aligner = FeatureAligner(tiny_backbone, num_timesteps=3)
    student_calls, teacher_calls = [], []
    def batch_of(args, kwargs):
        return (args[0] if args else kwargs["sample"]).shape[0]

    hs = aligner.student.register_forward_pre_hook(lambda m, a, kw: student_calls.append(batch_of(a, kw)),
                                                   with_kwargs=True)
    ht = aligner.teacher.register_forward_pre_hook(lambda m, a, kw: teacher_calls.append(batch_of(a, kw)),
                                                   with_kwargs=True)
    try:
        aligner(images, generator=_gen()).loss.backward()
    finally:
        hs.remove()
        ht.remove()
    assert student_calls == [2]  # one pass over the B clean latents, not B*I copies
    assert teacher_calls == [6]


def test_broadcast_student_equals_reference_repeated_student(tiny_backbone, images):
    """Running the student once and broadcasting == the reference's B*I identical copies (loss and grads).

    In float64: in float32 the batch size changes the kernels' summation order (~1e-6), which
    non-identity heads amplify to ~1e-4 in the loss -- noise, not an algorithmic difference.
    """
    aligner = FeatureAligner(tiny_backbone, taps="us3,us6", student_dtype=torch.float64).double()
    with torch.no_grad():
        for p in aligner.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=_gen(5)) * 0.02)
    out = aligner(images, generator=_gen(2))
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in aligner.named_parameters() if p.grad is not None}
    aligner.zero_grad()

    from cleandift.loss import alignment_loss

    g = _gen(2)
    x0 = aligner.encode(images, g)
    cond = tiny_backbone.encode_prompts(None, 2)
    t = aligner.sample_timesteps(2, g, x0.device).reshape(-1)
    eps = torch.randn((6, *x0.shape[1:]), generator=g)
    target = aligner.teacher_features(x0, eps, t, cond)
    feats = aligner.student_features(x0.repeat_interleave(3, 0), cond.repeat_interleave(3, 0))
    c = aligner.heads.condition(t)
    pred = {k: aligner.heads.project(k, v, c) for k, v in feats.items()}
    loss, _ = alignment_loss(pred, target)
    loss.backward()
    torch.testing.assert_close(out.loss, loss, rtol=1e-10, atol=1e-10)
    for n, p in aligner.named_parameters():
        if p.grad is not None:  # diffusers embeds the timestep in float32: gradients through it are fp32-exact
            tol = dict(rtol=1e-5, atol=1e-7) if n == "timestep" else dict(rtol=1e-6, atol=1e-8)
            torch.testing.assert_close(ours[n], p.grad, **tol)


def test_gradients_reach_student_heads_timestep_only(tiny_backbone, images):
    aligner = FeatureAligner(tiny_backbone, taps="mid,us4,us10")
    opt = torch.optim.Adam(aligner.trainable_parameters(), lr=1e-3)
    # Zero-init chain: at step 0 only the heads' down_proj get a gradient, then norm.linear / up_proj,
    # then the timestep network, and after three updates every parameter.
    for step in range(4):
        opt.zero_grad()
        aligner(images, ["a cat", "a dog"], generator=_gen(step)).loss.backward()
        if step < 3:
            opt.step()
    frozen = [tiny_backbone.unet, tiny_backbone.vae, tiny_backbone.text_encoder]
    assert all(p.grad is None and not p.requires_grad for m in frozen for p in m.parameters())
    head_grads = [p.grad for p in aligner.heads.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in head_grads)
    student_grads = [p.grad for p in aligner.student.parameters() if p.grad is not None]
    assert len(student_grads) > 0.8 * len(list(aligner.student.parameters()))
    assert aligner.student.conv_out.weight.grad is None  # after the last tap: never computed
    assert aligner.timestep.grad is not None and aligner.timestep.grad.abs() > 0


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tiny_backbone, images):
    aligner = FeatureAligner(tiny_backbone, taps="mid,us6")
    opt = torch.optim.Adam(aligner.trainable_parameters(), lr=3e-4)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        out = aligner(images, generator=_gen(7))  # same noise and timesteps every step
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_gradient_checkpointing_gives_the_same_gradients(tiny_backbone, images):
    """Hooks stop the forward early and are removed before backward: recompute must still be exact."""
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        aligner = FeatureAligner(tiny_backbone, taps="mid,us2", gradient_checkpointing=ckpt)  # us2: inside a ckpt'd resnet
        recomputed = []
        resnet = aligner.student.down_blocks[0].resnets[0]
        hook = resnet.register_forward_pre_hook(lambda m, a, r=recomputed: r.append(1))
        out = aligner(images, generator=_gen(4))
        calls_forward = len(recomputed)
        out.loss.backward()
        hook.remove()
        assert (len(recomputed) > calls_forward) == ckpt  # checkpointing really re-ran the block
        grads.append({n: p.grad for n, p in aligner.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)


def test_bf16_teacher_on_a_copied_backbone(tiny_backbone, images):
    backbone = copy.deepcopy(tiny_backbone)
    aligner = FeatureAligner(backbone, taps="us6", teacher_dtype=torch.bfloat16)
    assert aligner.teacher_dtype == torch.bfloat16 and aligner.student_dtype == torch.float32
    out = aligner(images, generator=_gen())
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert next(tiny_backbone.unet.parameters()).dtype == torch.float32  # the session backbone is untouched


def _reference_full_state(aligner: FeatureAligner, heads: ProjectionHeads, timestep: float) -> dict:
    """Exactly the key layout of cleandift_sd*_full.safetensors (StableFeatureAligner.state_dict())."""
    state = {f"unet_feature_extractor_cleandift.{k}": v.to(torch.bfloat16) for k, v in aligner.student.state_dict().items()}
    state.update({f"unet_feature_extractor_base.{k}": v.to(torch.bfloat16) for k, v in aligner.teacher.state_dict().items()})
    state.update({k: v.to(torch.bfloat16) for k, v in heads.state_dict().items()})  # adapters./mapping./time_in_proj./time_emb.weight
    state["timestep"] = torch.tensor(timestep, dtype=torch.bfloat16)
    state["ae.vae.encoder.conv_in.weight"] = torch.zeros(8, 3, 3, 3, dtype=torch.bfloat16)
    return state


def test_loads_heads_strictly_from_the_reference_full_layout(tiny_backbone, tmp_path):
    from safetensors.torch import save_file

    aligner = FeatureAligner(tiny_backbone)
    released = ProjectionHeads({t.name: t.channels for t in tiny_backbone.taps.select(None)})
    with torch.no_grad():
        for p in released.parameters():
            p.normal_(0, 0.02, generator=_gen(9))
    path = tmp_path / "cleandift_tiny_full.safetensors"
    save_file(_reference_full_state(aligner, released, 262.0), str(path))

    ckpt = read_checkpoint(path)
    assert ckpt.format == "full" and set(ckpt.heads) == set(released.state_dict())
    aligner.load_checkpoint(path)
    assert aligner.timestep.item() == 262.0
    for k, v in released.state_dict().items():
        torch.testing.assert_close(aligner.state_dict()[k], v.to(torch.bfloat16).float())

    subset = FeatureAligner(tiny_backbone, taps="us6")  # heads of unselected taps are ignored
    subset.load_checkpoint(path, student=False)


def test_wrong_heads_are_refused_with_a_clear_message(tiny_backbone):
    aligner = FeatureAligner(tiny_backbone, taps="us6,us10")
    channels = {t.name: t.channels for t in tiny_backbone.taps.select("us6,us10")}
    film = ProjectionHeads(channels, HeadConfig(head_norm="film"))
    with pytest.raises(CheckpointMismatchError, match="head_norm='film'"):
        aligner.load_checkpoint(_reference_full_state(aligner, film, 261.0))
    missing_tap = ProjectionHeads({"us6": channels["us6"]})
    with pytest.raises(CheckpointMismatchError, match="adapters.us10"):
        aligner.load_checkpoint(_reference_full_state(aligner, missing_tap, 261.0), student=False)
    unet_only = {k: v for k, v in aligner.student.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match="no projection heads"):
        aligner.load_checkpoint(unet_only)


def test_extract_raw_and_projected_features(tiny_backbone, images):
    aligner = FeatureAligner(tiny_backbone, taps="us6,us9")
    raw = aligner.extract(images, "a photo")
    assert raw["us6"].shape[:2] == (2, tiny_backbone.taps["us6"].channels)
    projected = aligner.extract(images, "a photo", t=499)
    torch.testing.assert_close(projected["us6"], raw["us6"])  # identity at init
    with pytest.raises(ConfigError):
        FeatureAligner(tiny_backbone, use_heads=False, taps="us6").extract(images, t=499)


def test_bad_options_are_config_errors(tiny_backbone):
    with pytest.raises(ConfigError, match="student_timestep"):
        FeatureAligner(tiny_backbone, student_timestep="none")
    with pytest.raises(ConfigError, match="cosine"):
        FeatureAligner(tiny_backbone, loss="huber")
    with pytest.raises(ConfigError, match="t_min"):
        FeatureAligner(tiny_backbone, t_min=500, t_max=100)
