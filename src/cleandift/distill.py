"""CleanDIFT distillation: align a clean-input student U-Net with the frozen, noisy-input teacher.

One training forward (:meth:`FeatureAligner.forward`)::

    x0      = backbone.encode_images(images)                        # once per image
    t       = stratified_timesteps(B, I)                            # (B, I), one t per noise bin
    teacher = U_frozen(add_noise(x0, eps, t), t, prompt)            # B*I samples, no grad, stops after last tap
    student = U_student(x0, timestep, prompt)                       # B samples: ONCE per image
    loss    = sum_k -cos(head_k(student_k broadcast to I, t), teacher_k)

The reference code runs the student on ``B*I`` identical copies of ``x0``; running it once and
broadcasting its features to the ``I`` heads gives the same loss and the same gradients (the
gradient of a broadcast is the sum over the copies) for a third of the student's cost.

Two student kinds (``student=``):

* ``"full"`` (the reference recipe): a trainable deep copy of the denoiser.
* ``"lora"`` (the paper's App. F recipe for SDXL / Flux): peft LoRA adapters injected into the backbone's
  own denoiser (:mod:`cleandift.lora`). The teacher is the same module with the adapters switched off,
  so the base weights exist once; only adapters, heads, mapping and the student timestep train.

The heads are conditioned on the teacher's noise level: ``t`` itself for variance-preserving families
(as the reference), ``1000 * sigma(t)`` for rectified-flow families (see :meth:`head_timesteps`).

Attribute names reproduce the reference ``StableFeatureAligner`` so that ``state_dict()`` has the
layout of the released ``cleandift_sd*_full.safetensors`` minus the frozen parts:
``unet_feature_extractor_cleandift.*`` (student), ``adapters.*``, ``mapping.*``, ``time_in_proj.*``,
``time_emb.weight`` and ``timestep``. The teacher (the backbone's U-Net) and the VAE / text encoder
are *not* registered submodules: they are frozen, so training checkpoints never store them;
:meth:`FeatureAligner.reference_state_dict` adds ``unet_feature_extractor_base.*`` for a full export.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch
from torch import nn

from .backbones.base import DiffusionBackbone, PromptInput
from .backbones.conditioning import Conditioning
from .checkpoints import StudentCheckpoint, check_fits, read_checkpoint, split_checkpoint
from .errors import CheckpointMismatchError, ConfigError
from .features import flatten_hw
from .heads import HeadConfig, ProjectionHeads
from .lora import STUDENT_KINDS, LoraSettings, LoraWeights, adapters_disabled
from .loss import LossKind, alignment_loss, check_loss
from .taps import Tap
from .timesteps import DIFT_TIMESTEP, stratified_timesteps, validate_timestep

log = logging.getLogger(__name__)

StudentTimestep = Literal["learned", "fixed"]
StudentKind = Literal["full", "lora"]
STUDENT_TIMESTEPS: tuple[str, ...] = ("learned", "fixed")


@dataclass
class AlignOutput:
    """Result of one forward: ``loss`` (scalar, float32), ``per_tap`` losses and the teacher ``t`` ``(B, I)``."""

    loss: torch.Tensor
    per_tap: dict[str, torch.Tensor]
    t: torch.Tensor


class FeatureAligner(nn.Module):
    """Student U-Net + projection heads, trained to reproduce the frozen teacher's noisy features.

    Args:
        backbone: supplies the VAE, prompt encoder, noise schedule and the frozen teacher
            (``backbone.unet``). The aligner *uses* the backbone; with ``teacher_dtype`` set it casts
            ``backbone.unet`` in place (a separate teacher copy would cost a whole U-Net of memory).
        taps: taps to align (names, comma string, ``"all"``; default: the 11 reference taps).
        num_timesteps: ``I``, stratification bins = teacher timesteps per image (paper/reference 3).
        t_min, t_max: teacher timesteps are drawn from ``[t_min, t_max)`` (reference 1, 999).
        loss: ``"cosine"`` (paper, default), ``"l1"`` or ``"mse"`` (Table 3 ablations).
        use_heads: ``False`` is the paper's "no heads" ablation (student features compared directly).
        head_config: :class:`~cleandift.heads.HeadConfig` (reference defaults: AdaRMS, depth 3).
        student_timestep: ``"learned"`` -- a trainable scalar, as in the reference code (default);
            ``"fixed"`` -- frozen at ``timestep_init``, closer to the paper's "no timestep input".
        timestep_init: initial student timestep (261, DIFT's t; the released students start there).
        sample_posterior: sample the VAE posterior instead of its mean (reference True; it adds a
            little augmentation, and teacher and student see the same sample).
        teacher_dtype: cast the teacher to this dtype (e.g. bf16 halves its memory); ``None`` keeps it.
            The backbone reports its U-Net's dtype, so latents and prompt embeddings then arrive in
            that dtype too (as in the reference, whose text encoder ran in bf16).
        student_dtype: dtype of the trainable student copy (float32 master weights by default).
        gradient_checkpointing: recompute the student's activations in backward (saves memory at
            64x64 latents and up; ~25-30 % slower).
        student: an already built student U-Net to train (default: a copy of ``backbone.unet``).
        student_kind: ``"full"`` (a trainable copy, default) or ``"lora"`` (adapters in the shared denoiser).
        lora: :class:`~cleandift.lora.LoraSettings` for ``student_kind="lora"`` (default: rank 64, family preset).

    Device: the backbone is not a submodule, so ``aligner.to(device)`` moves only the trainable
    parts; move the backbone yourself (``backbone.to(device)``) -- build the aligner after that and
    the student copy is already in place.
    """

    def __init__(self, backbone: DiffusionBackbone, *, taps: str | Sequence[str] | None = None,
                 num_timesteps: int = 3, t_min: int = 1, t_max: int = 999, loss: LossKind = "cosine",
                 use_heads: bool = True, head_config: HeadConfig | None = None,
                 student_timestep: StudentTimestep = "learned", timestep_init: float = DIFT_TIMESTEP,
                 sample_posterior: bool = True, teacher_dtype: torch.dtype | None = None,
                 student_dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False,
                 student: nn.Module | None = None, student_kind: StudentKind = "full",
                 lora: LoraSettings | None = None) -> None:
        super().__init__()
        _check_options(num_timesteps, t_min, t_max, backbone.num_train_timesteps, student_timestep)
        if student_kind not in STUDENT_KINDS:
            raise ConfigError(f"student={student_kind!r} is not one of {', '.join(STUDENT_KINDS)}")
        if student_kind == "lora" and student is not None:
            raise ConfigError("a LoRA student lives inside the backbone's denoiser; do not pass student=")
        self.__dict__["backbone"] = backbone  # unregistered: frozen parts stay out of state_dict/optimizer
        self.selected_taps: list[Tap] = backbone.taps.select(taps if taps is not None else backbone.taps.default)
        self.num_timesteps = int(num_timesteps)
        self.t_min, self.t_max = int(t_min), int(t_max)
        self.loss_kind = check_loss(loss)
        self.sample_posterior = bool(sample_posterior)
        self.student_timestep_mode = student_timestep
        self.gradient_checkpointing = bool(gradient_checkpointing)

        self.student_kind = student_kind
        self.lora_settings = (lora or LoraSettings()) if student_kind == "lora" else None
        if student_kind == "lora":
            self._build_lora_student(backbone, teacher_dtype)
        else:
            self._build_full_student(backbone, student, student_dtype, teacher_dtype)

        validate_timestep(float(timestep_init), backbone.num_train_timesteps, "timestep_init")
        learned = student_timestep == "learned"
        self.timestep = nn.Parameter(torch.tensor(float(timestep_init)), requires_grad=learned)

        self.head_config = (head_config or HeadConfig()) if use_heads else None
        heads = None
        if self.head_config is not None:
            heads = ProjectionHeads({t.name: t.channels for t in self.selected_taps}, self.head_config)
        self.__dict__["heads"] = heads
        if heads is not None:  # registered at top level so the keys match the reference layout
            self.time_emb = heads.time_emb
            self.time_in_proj = heads.time_in_proj
            self.mapping = heads.mapping
            self.adapters = heads.adapters

    def _build_full_student(self, backbone: DiffusionBackbone, student: nn.Module | None,
                            student_dtype: torch.dtype, teacher_dtype: torch.dtype | None) -> None:
        if student is None:
            student = copy.deepcopy(backbone.unet)
        if next(student.parameters()).dtype != student_dtype:
            student = student.to(dtype=student_dtype)
        student.requires_grad_(True)
        student.train()
        if self.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        self.unet_feature_extractor_cleandift = student
        _cast_teacher(backbone, teacher_dtype)
        backbone.unet.requires_grad_(False)
        backbone.unet.eval()

    def _build_lora_student(self, backbone: DiffusionBackbone, teacher_dtype: torch.dtype | None) -> None:
        """Adapters in ``backbone.denoiser`` (cast to ``teacher_dtype`` first: the base is shared)."""
        from .lora import add_lora, lora_config, target_modules  # noqa: PLC0415

        _cast_teacher(backbone, teacher_dtype)
        denoiser = backbone.denoiser
        settings = self.lora_settings
        add_lora(denoiser, lora_config(settings, target_modules(denoiser, settings.targets)))
        denoiser.eval()  # dropout-free base; adapter dropout follows self.train() (see train())
        if self.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()  # a no-op for the teacher: it runs under no_grad
        self.unet_feature_extractor_lora = LoraWeights(denoiser)

    def train(self, mode: bool = True) -> "FeatureAligner":
        super().train(mode)
        if self.student_kind == "lora":  # only the adapters' dropout follows; the shared base stays in eval
            from .lora import lora_layers  # noqa: PLC0415

            for layer in lora_layers(self.backbone.denoiser).values():
                layer.lora_dropout.train(mode)
        return self

    # ---------------------------------------------------------------------------- parts
    @property
    def student(self) -> nn.Module:
        """The module the student forward runs (a LoRA student: the shared denoiser, adapters on)."""
        if self.student_kind == "lora":
            return self.backbone.denoiser
        return self.unet_feature_extractor_cleandift

    @property
    def teacher(self) -> nn.Module:
        return self.backbone.unet

    @property
    def use_heads(self) -> bool:
        return self.heads is not None

    @property
    def tap_names(self) -> list[str]:
        return [t.name for t in self.selected_taps]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student, heads and (if learned) the student timestep -- what the optimizer updates."""
        return [p for p in self.parameters() if p.requires_grad]

    def describe(self) -> dict:
        """JSON-able summary (written next to exports and checkpoints)."""
        return {
            "taps": self.tap_names, "num_timesteps": self.num_timesteps, "t_min": self.t_min, "t_max": self.t_max,
            "loss": self.loss_kind, "use_heads": self.use_heads,
            "head_config": self.head_config.to_dict() if self.head_config else None,
            "student_timestep": self.student_timestep_mode, "timestep": float(self.timestep.detach()),
            "sample_posterior": self.sample_posterior,
            "teacher_dtype": str(self.teacher_dtype).replace("torch.", ""),
            "gradient_checkpointing": self.gradient_checkpointing, "backbone": self.backbone.describe(),
            "student": self.student_kind,
            "lora": self.lora_settings.to_dict() if self.lora_settings else None,
        }

    @property
    def teacher_dtype(self) -> torch.dtype:
        return next(self.teacher.parameters()).dtype

    @property
    def student_dtype(self) -> torch.dtype:
        """The dtype the student forward runs in (a LoRA student: the base's; its adapters are fp32)."""
        return next(self.student.parameters()).dtype

    # ---------------------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor | None, captions: PromptInput = None,
                generator: torch.Generator | None = None, *,
                moments: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> AlignOutput:
        """Alignment loss of one batch of images ``(B, 3, H, W)`` in ``[-1, 1]``.

        ``captions``: one prompt per image, one shared prompt, or ``None`` (empty prompt); teacher
        and student get the same embedding. All random draws (posterior sample, timesteps, noise)
        come from ``generator`` in that order, so a seeded generator makes the step reproducible.
        ``moments``: the images' cached posterior ``(mean, std)`` (``backbone.image_moments``) instead of
        ``images`` (pass ``None``); the VAE is skipped and the draws are the same (see :meth:`encode`).
        """
        b = images.shape[0] if moments is None else moments[0].shape[0]
        x0 = self.encode(images, generator, moments=moments)
        cond = self.backbone.encode_prompts(captions, b)
        t = self.sample_timesteps(b, generator, x0.device)
        eps = _randn((b * self.num_timesteps, *x0.shape[1:]), generator, x0.device)
        target = self.teacher_features(x0, eps, t.reshape(-1), cond)
        pred = self.project(self.student_features(x0, cond), self.head_timesteps(t.reshape(-1), x0))
        loss, per_tap = alignment_loss(pred, target, self.loss_kind)
        return AlignOutput(loss, per_tap, t)

    def encode(self, images: torch.Tensor | None, generator: torch.Generator | None = None, *,
               moments: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
        """Clean U-Net input ``x0`` (float32), encoded once per image.

        With ``moments`` (cached ``(mean, std)`` on the backbone's device) the posterior is sampled here
        exactly as ``LatentBackbone.encode_images`` samples it -- the same draw from ``generator``, the
        same arithmetic and casts -- so equal moments give a bit-identical ``x0``.
        """
        if moments is None:
            return self.backbone.encode_images(images, sample_posterior=self.sample_posterior,
                                               generator=generator).float()
        mean, std = moments
        if not self.sample_posterior or std is None:
            return mean.to(self.backbone.dtype).float()
        eps = torch.randn(mean.shape, generator=generator, device=generator.device if generator else mean.device,
                          dtype=mean.dtype).to(mean.device)
        return (mean + std * eps).to(self.backbone.dtype).float()

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None,
                         device: torch.device) -> torch.Tensor:
        gen_device = generator.device if generator is not None else None
        return stratified_timesteps(batch_size, self.num_timesteps, self.t_min, self.t_max, generator=generator,
                                    device=gen_device).to(device)

    @torch.no_grad()
    def teacher_features(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                         cond: Conditioning) -> dict[str, torch.Tensor]:
        """Teacher taps on ``x_t`` for every (image, timestep): ``{tap: (B*I, HW, C)}``, image-major."""
        i = self.num_timesteps
        x_t = self.backbone.add_noise(x0.repeat_interleave(i, 0), eps, t)
        dtype = self.teacher_dtype
        cond = cond.repeat_interleave(i).to(dtype)
        with self.teacher_mode():
            feats = self.backbone.run_taps(x_t.to(dtype), t, cond, self.selected_taps, denoiser=self.teacher)
        return {name: flatten_hw(f) for name, f in feats.items()}

    def teacher_mode(self):
        """Context in which ``self.teacher`` is the frozen base (a LoRA student: adapters switched off)."""
        if self.student_kind == "lora":
            return adapters_disabled(self.backbone.denoiser)
        return contextlib.nullcontext()

    def head_timesteps(self, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The timestep the heads are conditioned on: the teacher's noise level in ``[0, 1000)`` units.

        Variance-preserving families: ``t`` itself (the reference). Rectified-flow families: ``1000 * sigma``,
        the sigma the teacher's input actually had -- with Flux's resolution-dependent shift the same ``t``
        is a different noise level at another image size, and the heads should see the noise, not the index.
        """
        if self.backbone.noise.kind == "variance-preserving":
            return t
        sigma = self.backbone.noise.sigma(t.float(), seq_len=self.backbone.token_count(x0))
        return (sigma * self.backbone.num_train_timesteps).to(t.device)

    def student_features(self, x0: torch.Tensor, cond: Conditioning) -> dict[str, torch.Tensor]:
        """Student taps on the clean ``x0`` at its own timestep: ``{tap: (B, HW, C)}`` (one pass per image)."""
        dtype = self.student_dtype
        feats = self.backbone.run_taps(x0.to(dtype), self.timestep.to(dtype), cond.to(dtype), self.selected_taps,
                                       denoiser=self.student)
        # a LoRA student on a bf16 base yields bf16 features; the heads keep their (fp32) master weights' dtype
        dtype = next(self.heads.parameters()).dtype if self.heads is not None else dtype
        return {name: flatten_hw(f).to(dtype) for name, f in feats.items()}

    def project(self, student: Mapping[str, torch.Tensor], t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Broadcast each image's student tokens to its ``I`` timesteps and apply the heads (if any)."""
        i = self.num_timesteps
        repeated = {name: f.repeat_interleave(i, 0) for name, f in student.items()}
        if self.heads is None:
            return repeated
        cond = self.heads.condition(t)
        return {name: self.heads.project(name, f, cond) for name, f in repeated.items()}

    # ---------------------------------------------------------------------------- inference
    @torch.no_grad()
    def extract(self, images: torch.Tensor, captions: PromptInput = None, t: float | None = None,
                taps: str | Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Student features ``{tap: (B, C, h, w)}`` (posterior mean); with ``t``, projected by the heads."""
        from .heads import project_features  # noqa: PLC0415

        selected = self.backbone.taps.select(taps if taps is not None else self.tap_names)
        x0 = self.backbone.encode_images(images, sample_posterior=False).to(self.student_dtype)
        cond = self.backbone.encode_prompts(captions, images.shape[0]).to(self.student_dtype)
        feats = self.backbone.run_taps(x0, self.timestep.to(self.student_dtype), cond, selected, denoiser=self.student)
        if t is None:
            return {k: v.float() for k, v in feats.items()}
        if self.heads is None:
            raise ConfigError("projected features need heads; this aligner was built with use_heads=False")
        validate_timestep(t, self.backbone.num_train_timesteps, "t")
        head_t = float(self.head_timesteps(torch.tensor([float(t)]), x0)[0])
        return {k: v.float() for k, v in project_features(self.heads, feats, head_t).items()}

    # ---------------------------------------------------------------------------- checkpoints
    def reference_state_dict(self, include_teacher: bool = True) -> dict[str, torch.Tensor]:
        """State dict in the released ``*_full`` layout (plus the teacher unless ``include_teacher=False``).

        The reference file also stores the VAE under ``ae.*``; it is never needed to load a student
        and is left out.
        """
        if self.student_kind == "lora":
            raise ConfigError("a LoRA student has no reference *_full layout; export it (adapters + merged) instead")
        state = {k: v.detach() for k, v in self.state_dict().items()}
        if include_teacher:
            teacher = self.teacher.state_dict()
            state.update({f"unet_feature_extractor_base.{k}": v.detach() for k, v in teacher.items()})
        return state

    def load_checkpoint(self, checkpoint: str | StudentCheckpoint | Mapping[str, torch.Tensor], *,
                        student: bool = True, heads: bool = True, timestep: bool = True) -> StudentCheckpoint:
        """Initialise from a released ``*_full`` / ``*_unet`` file, an export folder or a state dict.

        Each part is loaded strictly: the student must fit the U-Net exactly, and the heads of the
        selected taps (plus the timestep network) must match the configured heads key for key and
        shape for shape -- otherwise :class:`CheckpointMismatchError` explains what differs.
        Heads of taps that are not selected are ignored.
        """
        ckpt = _as_checkpoint(checkpoint)
        if student and self.student_kind == "lora":
            self._load_lora_checkpoint(ckpt)
        elif student and ckpt.lora is not None:
            raise CheckpointMismatchError(f"{ckpt.source}: a LoRA student; initialise a LoRA student from it "
                                          "(--student lora) or pass its merged export folder")
        elif student and ckpt.student:
            check_fits(self.student, ckpt.student, ckpt.source)
            weights = {k: v.to(self.student_dtype) for k, v in ckpt.student.items()}
            self.student.load_state_dict(weights, strict=True)
        if heads and self.heads is not None:
            if not ckpt.heads:
                raise CheckpointMismatchError(
                    f"{ckpt.source}: contains no projection heads (adapters.*); load it with heads=False "
                    "(or --no-heads), or use a *_full file / `cleandift train` export")
            self.heads.load_reference_state(self._own_heads(ckpt.heads), ckpt.source)
        if timestep and ckpt.timestep is not None:
            with torch.no_grad():
                self.timestep.fill_(float(ckpt.timestep))
        return ckpt

    def _load_lora_checkpoint(self, ckpt: StudentCheckpoint) -> None:
        from .lora import load_lora_state  # noqa: PLC0415

        if ckpt.lora is None:
            raise CheckpointMismatchError(
                f"{ckpt.source}: holds a full student, not LoRA adapters; train a full student from it "
                "(--student full) or load only its heads")
        if ckpt.lora.rank != self.lora_settings.rank:
            raise CheckpointMismatchError(
                f"{ckpt.source}: LoRA rank {ckpt.lora.rank}, but this student has rank {self.lora_settings.rank}; "
                f"pass --lora-rank {ckpt.lora.rank}")
        alpha = float(self.lora_settings.alpha or self.lora_settings.rank)
        if abs(ckpt.lora.alpha - alpha) > 1e-6 * alpha:
            raise CheckpointMismatchError(
                f"{ckpt.source}: LoRA alpha {ckpt.lora.alpha:g}, but this student has alpha {alpha:g} (the adapters "
                f"would train at another scale); pass --lora-alpha {ckpt.lora.alpha:g}")
        load_lora_state(self.backbone.denoiser, ckpt.lora.state, ckpt.source)

    def _own_heads(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        taps_in_ckpt = {k.split(".")[1] for k in state if k.startswith("adapters.")}
        if not set(self.tap_names) <= taps_in_ckpt:
            return dict(state)  # let the strict check report the missing taps
        keep = ("mapping.", "time_in_proj.", "time_emb.") + tuple(f"adapters.{t}." for t in self.tap_names)
        return {k: v for k, v in state.items() if k.startswith(keep)}


def _as_checkpoint(checkpoint: str | StudentCheckpoint | Mapping[str, torch.Tensor]) -> StudentCheckpoint:
    if isinstance(checkpoint, StudentCheckpoint):
        return checkpoint
    if isinstance(checkpoint, Mapping):
        return split_checkpoint(dict(checkpoint))
    return read_checkpoint(checkpoint)


def _cast_teacher(backbone: DiffusionBackbone, dtype: torch.dtype | None) -> None:
    if dtype is not None and backbone.dtype != dtype:
        backbone.unet.to(dtype=dtype)
        backbone.clear_prompt_cache()


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def _check_options(num_timesteps: int, t_min: int, t_max: int, num_train: int, student_timestep: str) -> None:
    if num_timesteps < 1:
        raise ConfigError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if not 0 <= t_min < t_max <= num_train:
        raise ConfigError(f"need 0 <= t_min < t_max <= {num_train}, got t_min={t_min}, t_max={t_max}")
    if student_timestep not in STUDENT_TIMESTEPS:
        raise ConfigError(f"student_timestep={student_timestep!r} is not one of {', '.join(STUDENT_TIMESTEPS)}")
