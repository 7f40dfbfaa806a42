"""A memory estimate for a training run, printed before the (possibly hour-long) model load pays off.

**This is an estimate, not a measurement.** Weights, gradients and optimizer state are exact
parameter arithmetic. Activations are counted by running the student and the heads once on the
``meta`` device (no memory, no compute) and adding up the tensors autograd saves for backward;
attention is counted as a fused (flash / memory-efficient) kernel that saves q, k, v, the output and
the log-sum-exp, which is what PyTorch picks on current GPUs and CPUs. Not included: the allocator's
fragmentation, cuDNN / CUDA context (~0.5-1 GB per GPU), and transient peaks inside single kernels.
bf16 autocast is modelled as bf16 activations everywhere (a slight underestimate: norms stay fp32).

Family-agnostic: the meta run goes through the family's own :meth:`~cleandift.backbones.base.
DiffusionBackbone.run_taps` (U-Nets and transformers alike) on a meta copy of the denoiser built from
its config, with meta conditioning of the shapes the family's prompt encoder produces.

Student kinds (:mod:`cleandift.lora`):

* ``full``: a trainable fp32 copy of the denoiser next to the frozen teacher -- two sets of weights,
  gradients and Adam state for every student parameter reached before the last tap.
* ``lora``: one set of base weights (in the teacher dtype; teacher = base with the adapters off) plus
  fp32 adapters. The adapters are injected into the meta copy exactly as training injects them
  (:func:`cleandift.lora.add_lora`, same rank / targets), so their parameter count is exact (``r * (in +
  out)`` per adapted Linear) and the meta forward records what autograd really saves: a frozen base
  Linear saves no input for a weight gradient, only the adapters' inputs (fp32) and rank-``r``
  intermediates are added. Gradients and Adam state exist for the adapters, heads and timestep only.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.conditioning import HIDDEN_STATES, Conditioning
from ..heads import HeadConfig, ProjectionHeads
from ..taps import Tap

GiB = 2**30
BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
#: Optimizer state bytes per trainable parameter (fused Adam keeps the same two fp32 moments).
OPTIMIZER_BYTES = {"adam": 8, "adam-fused": 8, "adam-foreach": 8, "adam8bit": 2}
#: Transient bytes per trainable parameter inside ``optimizer.step()``: foreach Adam materialises
#: ``sqrt(v)`` for every tensor at once; the fused kernel (the ``adam`` default) works in place.
OPTIMIZER_STEP_BYTES = {"adam-foreach": 4}


#: The family LoRA presets (:data:`cleandift.lora.TARGET_PRESETS`) in words, for reports and docs.
TARGET_WORDS: dict[str, str] = {
    "UNet2DConditionModel": "self-attention (attn1) q/k/v/out + feed-forward of every transformer block",
    "PixArtTransformer2DModel": "self-attention (attn1) q/k/v/out + feed-forward of every block",
    "SD3Transformer2DModel": "joint attention q/k/v/out of both streams + both feed-forwards of every block",
    "FluxTransformer2DModel": "joint attention q/k/v/out of both streams + both feed-forwards of the double blocks; "
                              "q/k/v + fused MLP (proj_mlp, proj_out) of the single blocks",
}


@dataclass
class ActivationProfile:
    """Saved-for-backward bytes for ONE image, fp32 (scale by 0.5 for bf16)."""

    student: int
    student_checkpointed: int
    heads: int  # for one (image, timestep) pair: multiply by I
    teacher_taps: int  # teacher features kept until the loss, per (image, timestep)
    teacher_peak: int  # live no-grad activations of one teacher sample (skip connections + largest map)
    reached_params: int  # trainable student parameters that get a gradient (those after the last tap do not)
    lora: int = 0  # part of ``student`` saved inside the LoRA adapters (fp32 master weights: not base dtype)


@dataclass
class LoraInfo:
    """The LoRA student's adapter: settings and exact parameter counts (see :func:`lora_count`)."""

    rank: int
    alpha: float
    targets: str  # the peft target_modules as given (a regex or a name list)
    layers: int  # adapted modules
    params: int  # all adapter parameters (r * (in + out) per Linear)
    words: str = ""  # the targets in words (family preset) or "custom"


@dataclass
class MemoryEstimate:
    """Byte counts of one configuration; :meth:`total` adds them for a batch."""

    student_params: int  # full: the student copy; lora: the adapters
    trainable_params: int  # what gets a gradient and optimizer state (incl. heads and the timestep)
    head_params: int
    teacher_params: int  # the frozen base denoiser (lora: the only copy)
    frozen_other_params: int  # VAE + text encoder(s) still loaded during training
    teacher_bytes_per_param: int
    profile: ActivationProfile
    batch_size: int
    num_timesteps: int
    rows: list[tuple[str, dict[str, float]]] = field(default_factory=list)
    student_kind: str = "full"
    lora: LoraInfo | None = None
    frozen_other_label: str = "VAE + text encoder"
    #: the same run with the other student kind (``estimate_memory(compare=True)``), for the report
    alternative: "MemoryEstimate | None" = None

    def components(self, precision: str = "fp32", checkpointing: bool = False, optimizer: str = "adam",
                   teacher_dtype: str | None = None) -> dict[str, float]:
        """GiB per component for one configuration."""
        p = self.profile
        act_scale = 0.5 if precision in ("bf16", "fp16") else 1.0
        student_act = p.student_checkpointed if checkpointing else p.student
        teacher_bpp = BYTES[_dtype(teacher_dtype)] if teacher_dtype else self.teacher_bytes_per_param
        b, i = self.batch_size, self.num_timesteps
        if self.student_kind == "lora":
            # the student forward runs in the base dtype; the adapters' inputs / intermediates are fp32
            base_scale = min(act_scale, teacher_bpp / 4)
            lora_act = p.lora * (student_act / p.student if p.student else 0.0)
            student_bytes = b * ((student_act - lora_act) * base_scale + lora_act * act_scale)
            parts = {
                "base weights (teacher = student)": self.teacher_params * teacher_bpp,
                "LoRA adapters (fp32)": self.student_params * 4,
                "heads weights (fp32)": self.head_params * 4,
            }
        else:
            student_bytes = b * student_act * act_scale
            parts = {
                "student weights (fp32)": self.student_params * 4,
                "heads weights (fp32)": self.head_params * 4,
                "teacher weights": self.teacher_params * teacher_bpp,
            }
        parts.update({
            "gradients (fp32)": self.trainable_params * 4,
            f"optimizer state ({optimizer})": self.trainable_params * OPTIMIZER_BYTES[optimizer],
            self.frozen_other_label: self.frozen_other_params * 4,
            "student activations": student_bytes,
            "head activations": b * i * p.heads * act_scale,
            "teacher features + peak": b * i * (p.teacher_taps + p.teacher_peak) * teacher_bpp / 4,
        })
        if optimizer in OPTIMIZER_STEP_BYTES:
            parts["optimizer step temporaries"] = self.trainable_params * OPTIMIZER_STEP_BYTES[optimizer]
        return {k: v / GiB for k, v in parts.items()}

    def total(self, **kwargs) -> float:
        return sum(self.components(**kwargs).values())

    def summary(self, precision: str = "fp32", checkpointing: bool = False, optimizer: str = "adam",
                teacher_dtype: str | None = None) -> dict[str, float]:
        """The breakdown in six groups (GiB): base / teacher weights, student or adapters (+ heads),
        gradients, optimizer, activations, frozen rest -- and ``total``."""
        parts = self.components(precision, checkpointing, optimizer, teacher_dtype)
        groups = {"base weights": 0.0, "student weights": 0.0, "gradients": 0.0, "optimizer": 0.0,
                  "activations": 0.0, "VAE + text encoders": 0.0}
        for name, gib in parts.items():
            if name.startswith(("base weights", "teacher weights")):
                key = "base weights"
            elif name.startswith(("student weights", "LoRA adapters", "heads weights")):
                key = "student weights"
            elif name.startswith("gradients"):
                key = "gradients"
            elif name.startswith("optimizer"):
                key = "optimizer"
            elif "activations" in name or name.startswith("teacher features"):
                key = "activations"
            else:
                key = "VAE + text encoders"
            groups[key] += gib
        groups["total"] = sum(parts.values())
        return groups

    def describe_student(self) -> str:
        """One line: the student kind and what trains."""
        heads = f", heads {self.head_params / 1e6:.2f} M" if self.head_params else ""
        if self.student_kind == "lora" and self.lora is not None:
            lo = self.lora
            return (f"  student: lora, rank {lo.rank}, alpha {lo.alpha:g}, {lo.layers} adapted layers "
                    f"({lo.words or 'targets ' + lo.targets})\n"
                    f"  trainable {self.trainable_params:,} parameters (adapters {lo.params:,}{heads}, timestep); "
                    f"base denoiser {self.teacher_params / 1e6:.1f} M (teacher = student with the adapters off, "
                    "stored once)")
        return (f"  student: full copy of the denoiser ({self.student_params / 1e6:.1f} M); trainable "
                f"{self.trainable_params:,} parameters (incl. heads and timestep{heads}); teacher "
                f"{self.teacher_params / 1e6:.1f} M")

    def report(self, precision: str = "fp32", checkpointing: bool = False, optimizer: str = "adam",
               teacher_dtype: str | None = None) -> str:
        """The component breakdown of the chosen configuration plus the GPU table."""
        parts = self.components(precision, checkpointing, optimizer, teacher_dtype)
        ckpt = ", gradient checkpointing" if checkpointing else ""
        lines = [f"memory estimate (an estimate, see cleandift.train.memory): --student {self.student_kind}, batch "
                 f"{self.batch_size} x {self.num_timesteps} timesteps, {precision}{ckpt}, teacher "
                 f"{teacher_dtype or _dtype_name(self.teacher_bytes_per_param)}",
                 self.describe_student()]
        lines += [f"  {name:<38} {gib:8.2f} GiB" for name, gib in parts.items()]
        lines.append(f"  {'total':<38} {sum(parts.values()):8.2f} GiB  (+ ~0.5-1 GiB CUDA context on a GPU)")
        lines.append(f"  activations per image: student {self.profile.student / GiB:.2f} GiB fp32 "
                     f"({self.profile.student_checkpointed / GiB:.2f} with checkpointing), heads "
                     f"{self.num_timesteps * self.profile.heads / GiB:.2f} GiB")
        alt = self.alternative
        if alt is not None:
            mine = self.summary(precision, checkpointing, optimizer, teacher_dtype)
            other = alt.summary(precision, checkpointing, optimizer, teacher_dtype)
            lines.append(f"  compare (same settings)  {'--student ' + self.student_kind:>17} "
                         f"{'--student ' + alt.student_kind:>17}")
            lines += [f"    {name:<22} {mine[name]:11.2f} GiB {other[name]:13.2f} GiB" for name in mine]
        lines.append(self.table(teacher_dtype))
        return "\n".join(lines)

    def table(self, teacher_dtype: str | None = None) -> str:
        """Markdown table of totals for common GPU set-ups."""
        optimizers = ["adam", "adam8bit"]
        bnb = "installed" if importlib.util.find_spec("bitsandbytes") else "not installed"
        lines = ["", f"| precision | grad. ckpt | Adam (fp32 / fused) | 8-bit Adam (bitsandbytes: {bnb}) |",
                 "|---|---|---|---|"]
        for precision in ("fp32", "bf16"):
            for ckpt in (False, True):
                totals = [self.total(precision=precision, checkpointing=ckpt, optimizer=o,
                                     teacher_dtype=teacher_dtype) for o in optimizers]
                cells = [f"{t:.1f} GiB" for t in totals]
                name = "fp32" if precision == "fp32" else "bf16 autocast"
                lines.append(f"| {name} | {'yes' if ckpt else 'no'} | {cells[0]} | {cells[1]} |")
        return "\n".join(lines)


def _dtype(name: str | torch.dtype | None) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(name or "fp32", torch.float32)


def _dtype_name(bytes_per_param: int) -> str:
    return "fp32" if bytes_per_param == 4 else "16-bit"


# ---------------------------------------------------------------------------------------------- counting
class _SavedBytes:
    """Adds up tensors saved for backward (each storage once), skipping parameters.

    Every counted tensor is kept referenced until the counter goes: storages are told apart by ``id``, and
    a tensor freed mid-forward (e.g. the q / k / v the fused-attention stand-in counts) would hand its id
    to a later tensor, which would then be skipped -- an undercount that changed from run to run.
    """

    def __init__(self, params: Sequence[nn.Parameter] = ()) -> None:
        self.params = {id(p) for p in params}
        self.seen: set[int] = set()
        self.kept: list[torch.Tensor] = []  # meta tensors: holding them costs nothing
        self.total = 0

    def add(self, t: torch.Tensor) -> None:
        base = t._base if t._base is not None else t
        if id(base) in self.params or isinstance(base, nn.Parameter) or id(base) in self.seen:
            return
        self.seen.add(id(base))
        self.kept.append(base)
        self.total += base.numel() * base.element_size()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t

    @contextlib.contextmanager
    def recording(self) -> Iterator["_SavedBytes"]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t), _fused_attention(self):
            yield self


@contextlib.contextmanager
def _fused_attention(counter: _SavedBytes) -> Iterator[None]:
    """On meta tensors SDPA falls back to the math kernel (which saves the full attention matrix);
    count what a fused kernel saves instead: q, k, v, output and the fp32 log-sum-exp."""
    original = F.scaled_dot_product_attention

    def fused(query, key, value, *args, **kwargs):
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        if torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value)):
            for x in (query, key, value, out):
                counter.add(x)
            counter.total += query.shape[:-1].numel() * 4
            out = out + 0 * query.sum() + 0 * key.sum() + 0 * value.sum()
        return out

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _meta_denoiser(denoiser: nn.Module) -> nn.Module:
    """A parameter-less twin of ``denoiser`` (U-Net or transformer) from its config; never any adapter."""
    with torch.device("meta"):
        return type(denoiser).from_config(denoiser.config)


_meta_unet = _meta_denoiser  # the historical name


#: Modules diffusers' gradient checkpointing wraps (one unit is re-materialised at a time in backward).
_CHECKPOINT_UNITS = (["resnets"], ["transformer_blocks"], ["single_transformer_blocks"])


def profile_activations(backbone, taps: Sequence[Tap], latent_shape: tuple[int, int, int],
                        head_config: HeadConfig | None, *, lora_config=None, learned_timestep: bool = True,
                        conditioning: Conditioning | None = None) -> ActivationProfile:
    """Measure per-image saved activations on the ``meta`` device (fast, allocates nothing).

    One instrumented student forward (the family's :meth:`run_taps` on a meta copy of the denoiser) gives:
    all saved bytes; saved bytes and inputs of every unit diffusers checkpoints (each resnet and each
    transformer block: checkpointing keeps the inputs, drops what the unit saved, and re-materialises one
    unit at a time in backward); the U-Net down path's skip connections (alive during the teacher's
    no-grad pass; a transformer keeps its residual stream and one block's largest intermediate instead);
    and the trainable parameters reached before the last tap (the others get no gradient and no optimizer
    state). With ``lora_config`` (a peft ``LoraConfig``) the base is frozen and the adapter injected as in
    training, so only what autograd saves for the adapters' gradients is counted.
    """
    meta = _meta_denoiser(backbone.denoiser)
    if lora_config is not None:
        _inject_meta_lora(meta, lora_config)
        meta.eval()  # as in training: the shared base stays in eval, the adapters' dropout trains
        for name, module in meta.named_modules():
            if name.endswith(".lora_dropout"):
                module.train()
    else:
        meta.train()
    x = torch.zeros(1, *latent_shape, device="meta")
    cond = conditioning if conditioning is not None else meta_conditioning(backbone)
    t = torch.tensor(261.0, device="meta", requires_grad=learned_timestep)

    counter = _SavedBytes(list(meta.parameters()))
    unit_saved: list[int] = []
    unit_inputs: list[int] = []
    down_outputs: list[int] = []
    lora_saved = [0]
    largest = [0]
    ran: set[int] = set()
    handles = []

    def pre(module, args, kwargs):
        unit_inputs.append(sum(_nbytes(a) for a in (*args, *kwargs.values())))
        unit_saved.append(-counter.total)

    def post(module, args, out):
        unit_saved[-1] += counter.total

    def seen(module, args, out):
        largest[0] = max(largest[0], _nbytes(out))

    def lora_pre(module, args):
        lora_saved[0] -= counter.total

    def lora_post(module, args, out):
        lora_saved[0] += counter.total

    for name, module in meta.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a: ran.add(id(m))))
        if not any(True for _ in module.children()):
            handles.append(module.register_forward_hook(seen))
        if name.split(".")[-2:-1] in _CHECKPOINT_UNITS:
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post))
        if name.startswith("down_blocks.") and name.count(".") == 1:  # output: (hidden, skip connections)
            handles.append(module.register_forward_hook(lambda m, a, o: down_outputs.append(_skip_bytes(o))))
        if name.split(".")[-2:-1] in (["lora_A"], ["lora_B"]):
            handles.append(module.register_forward_pre_hook(lora_pre))
            handles.append(module.register_forward_hook(lora_post))
    try:
        with counter.recording():
            feats = backbone.run_taps(x, t, cond, taps, denoiser=meta)
    finally:
        for h in handles:
            h.remove()
    done = [b for b in unit_saved if b >= 0]  # the last tap may stop inside a unit
    student = counter.total
    student_ckpt = student - sum(done) + sum(unit_inputs[:len(done)]) + max(done, default=0)
    reached = sum(p.numel() for m in meta.modules() if id(m) in ran
                  for p in m.parameters(recurse=False) if p.requires_grad)

    heads_bytes = 0
    if head_config is not None:
        with torch.device("meta"):
            heads = ProjectionHeads({tp.name: tp.channels for tp in taps}, head_config)
        counter = _SavedBytes(list(heads.parameters()))
        tokens = {k: v.flatten(2).transpose(1, 2).detach().requires_grad_(True) for k, v in feats.items()}
        with counter.recording():
            heads(tokens, torch.zeros(1, device="meta"))
        heads_bytes = counter.total
    tap_bytes = sum(f.numel() * 4 for f in feats.values())
    if down_outputs:  # U-Net: the skip connections stay alive until the up path consumes them
        teacher_peak = sum(down_outputs) + 2 * max(down_outputs)
    else:  # transformer: the block's inputs (residual streams) and its largest intermediate
        teacher_peak = 2 * max(unit_inputs, default=0) + largest[0]
    return ActivationProfile(student, student_ckpt, heads_bytes, tap_bytes, teacher_peak, reached, lora_saved[0])


def _inject_meta_lora(meta: nn.Module, config) -> None:
    """:func:`cleandift.lora.add_lora` on a meta model (adapter tensors created on meta, nothing allocated)."""
    from ..lora import add_lora  # noqa: PLC0415

    with torch.device("meta"):
        add_lora(meta, config)


def _skip_bytes(o) -> int:
    if isinstance(o, (tuple, list)) and len(o) == 2 and isinstance(o[1], (tuple, list)):
        return sum(_nbytes(r) for r in o[1])
    return _nbytes(o)


def _nbytes(o) -> int:
    if isinstance(o, torch.Tensor):
        return o.numel() * 4
    if isinstance(o, (tuple, list)) and o and isinstance(o[0], torch.Tensor):
        return o[0].numel() * 4
    return 0


def count_params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _base_params(denoiser: nn.Module) -> int:
    """Parameters of the denoiser without any LoRA adapter it may carry."""
    return sum(p.numel() for name, p in denoiser.named_parameters() if ".lora_" not in name)


# ---------------------------------------------------------------------------------------------- LoRA
def lora_peft_config(backbone, settings=None):
    """The peft ``LoraConfig`` a LoRA run of ``backbone`` injects: from ``settings`` (a :class:`~cleandift.lora.
    LoraSettings`, ``None`` = defaults), or -- when the denoiser already carries the student adapter (an
    aligner was built on it) -- that adapter's own config."""
    import copy  # noqa: PLC0415

    from ..lora import LORA_ADAPTER, LoraSettings, has_lora, lora_config, target_modules  # noqa: PLC0415

    denoiser = backbone.denoiser
    if settings is None and has_lora(denoiser):
        return copy.deepcopy(denoiser.peft_config[LORA_ADAPTER])
    settings = settings if settings is not None else LoraSettings()
    return lora_config(settings, target_modules(denoiser, settings.targets))


def lora_count(backbone, settings=None) -> tuple[LoraInfo, list[str]]:
    """Exact adapter size of a LoRA run (on a meta copy: nothing allocated) and the adapted module names."""
    from ..lora import lora_layers  # noqa: PLC0415

    config = lora_peft_config(backbone, settings)
    meta = _meta_denoiser(backbone.denoiser)
    _inject_meta_lora(meta, config)
    return _lora_info(meta, config), sorted(lora_layers(meta))


def _lora_info(meta: nn.Module, config) -> LoraInfo:
    from ..lora import TARGET_PRESETS, lora_layers, lora_parameters  # noqa: PLC0415

    targets = config.target_modules
    text = targets if isinstance(targets, str) else ",".join(sorted(targets))
    kind = type(meta).__name__
    words = TARGET_WORDS.get(kind, "") if text == TARGET_PRESETS.get(kind) else ""
    return LoraInfo(int(config.r), float(config.lora_alpha), text, len(lora_layers(meta)),
                    sum(p.numel() for p in lora_parameters(meta).values()), words or "custom targets")


# ---------------------------------------------------------------------------------------------- conditioning
def meta_conditioning(backbone, batch_size: int = 1) -> Conditioning:
    """Meta tensors shaped like the family's prompt conditioning (what the denoiser attends to).

    From the backbone's cached encodings when it has any (a training run caches its prompts), else from
    the denoiser's config for the known families (no encoder runs), else by encoding ``""`` once.
    """
    shapes = _cached_shapes(backbone) or _config_shapes(backbone) or _encoded_shapes(backbone)
    return Conditioning({k: torch.zeros(batch_size, *shape, dtype=dtype, device="meta")
                         for k, (shape, dtype) in shapes.items()})


def _cached_shapes(backbone) -> dict | None:
    for cache in (getattr(backbone, "_kept_prompts", None), getattr(backbone, "_prompt_cache", None)):
        if cache:
            row = next(iter(cache.values()))
            return {k: (tuple(v.shape), torch.float32 if v.is_floating_point() else v.dtype) for k, v in row.items()}
    return None


def _config_shapes(backbone) -> dict | None:
    denoiser = backbone.denoiser
    cfg = denoiser.config
    kind = type(denoiser).__name__
    f32 = torch.float32
    if kind == "UNet2DConditionModel":
        tokenizer = getattr(backbone, "tokenizer", None) or getattr(getattr(backbone, "pipe", None), "tokenizer", None)
        if tokenizer is None:  # e.g. a label-conditioned pixel model: ask its encoder
            return None
        length = min(int(getattr(tokenizer, "model_max_length", 77) or 77), 77)
        dim = cfg.cross_attention_dim
        dim = int(dim[0] if isinstance(dim, (tuple, list)) else dim)
        shapes = {HIDDEN_STATES: ((length, dim), f32)}
        if getattr(cfg, "addition_embed_type", None) == "text_time":
            pooled = int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim)
            shapes["text_embeds"] = ((pooled,), f32)
        return shapes
    length = getattr(backbone, "max_sequence_length", None)
    if length is None:
        return None
    length = int(length)
    if kind == "SD3Transformer2DModel":  # CLIP-L/G (77) + T5 (zeros without T5) on the token axis
        return {HIDDEN_STATES: ((77 + length, int(cfg.joint_attention_dim)), f32),
                "pooled_projections": ((int(cfg.pooled_projection_dim),), f32)}
    if kind == "FluxTransformer2DModel":
        return {HIDDEN_STATES: ((length, int(cfg.joint_attention_dim)), f32),
                "pooled_projections": ((int(cfg.pooled_projection_dim),), f32), "txt_ids": ((length, 3), f32)}
    if kind == "PixArtTransformer2DModel":
        return {HIDDEN_STATES: ((length, int(cfg.caption_channels)), f32),
                "encoder_attention_mask": ((length,), torch.int64)}
    return None


def _encoded_shapes(backbone) -> dict:
    cond = Conditioning.of(backbone.encode_prompts("", 1))
    return {k: (tuple(v.shape[1:]), torch.float32 if v.is_floating_point() else v.dtype) for k, v in cond.items()}


# ---------------------------------------------------------------------------------------------- entry
def _frozen_other(backbone, release_decoder: bool, release_prompt_encoder: bool,
                  release_encoder: bool = False) -> tuple[int, str]:
    """Parameters of the VAE and prompt encoder(s) a run keeps loaded, and the row label."""
    vae = getattr(backbone, "vae", None)
    n = count_params(vae)
    label = "VAE"
    if vae is not None and release_decoder:
        n -= count_params(getattr(vae, "decoder", None)) + count_params(getattr(vae, "post_quant_conv", None))
        label = "VAE encoder"
    if vae is not None and release_encoder:  # --cache-latents: encoded once, then freed
        n -= count_params(getattr(vae, "encoder", None)) + count_params(getattr(vae, "quant_conv", None))
        label = "VAE (cached latents)" if not release_decoder else "no VAE (cached latents)"
    names = ("text_encoder", *getattr(backbone, "text_encoder_names", ()), "label_encoder")
    encoders = [getattr(backbone, a, None) for a in dict.fromkeys(names)]
    if release_prompt_encoder:
        label += " (text encoders released)"
    else:
        n += sum(count_params(e) for e in encoders if isinstance(e, nn.Module))
        label += " + text encoder(s)"
    return n, label


def estimate_memory(backbone, taps: Sequence[Tap], image_size: int, batch_size: int, num_timesteps: int,
                    head_config: HeadConfig | None, student_timestep_learned: bool = True, *,
                    student_kind: str | None = None, lora=None, release_decoder: bool = False,
                    release_prompt_encoder: bool = False, release_encoder: bool = False,
                    compare: bool = False) -> MemoryEstimate:
    """Estimate the training memory for ``backbone`` at ``image_size`` px (see module docstring).

    ``student_kind``: ``"full"`` or ``"lora"``; ``None`` = ``"lora"`` when the denoiser already carries the
    student adapter (an aligner was built on it), else ``"full"``. ``lora``: the
    :class:`~cleandift.lora.LoraSettings` of a LoRA run (``None``: the carried adapter's, or the defaults).
    ``release_decoder`` / ``release_prompt_encoder``: count the VAE / text encoders as a training run keeps
    them (:func:`cleandift.train.loop.release_unused_parts`); ``release_encoder``: the VAE encoder too
    (``--cache-latents`` frees it after encoding every image once). ``compare``: also estimate the other student
    kind (``alternative``), so the report shows both side by side.
    """
    from ..lora import has_lora  # noqa: PLC0415

    denoiser = backbone.denoiser
    if student_kind is None:
        student_kind = "lora" if has_lora(denoiser) else "full"
    if student_kind not in ("full", "lora"):
        raise ValueError(f"student_kind must be 'full' or 'lora', got {student_kind!r}")
    c, h, w = backbone.input_shape((image_size, image_size))
    cond = meta_conditioning(backbone)
    peft_config = lora_peft_config(backbone, lora) if student_kind == "lora" else None
    profile = profile_activations(backbone, taps, (c, h, w), head_config, lora_config=peft_config,
                                  learned_timestep=student_timestep_learned, conditioning=cond)
    head_params = 0
    if head_config is not None:
        with torch.device("meta"):
            head_params = count_params(ProjectionHeads({tp.name: tp.channels for tp in taps}, head_config))
    base = _base_params(denoiser)
    teacher_bpp = BYTES.get(next(p for n, p in denoiser.named_parameters() if ".lora_" not in n).dtype, 4)
    other, label = _frozen_other(backbone, release_decoder, release_prompt_encoder, release_encoder)
    trainable = profile.reached_params + head_params + int(student_timestep_learned)
    info = None
    student = base
    if student_kind == "lora":
        meta = _meta_denoiser(denoiser)
        _inject_meta_lora(meta, peft_config)
        info = _lora_info(meta, peft_config)
        student = info.params
    estimate = MemoryEstimate(student, trainable, head_params, base, other, teacher_bpp, profile, batch_size,
                              num_timesteps, student_kind=student_kind, lora=info, frozen_other_label=label)
    if compare:
        estimate.alternative = estimate_memory(
            backbone, taps, image_size, batch_size, num_timesteps, head_config, student_timestep_learned,
            student_kind="full" if student_kind == "lora" else "lora", lora=lora,
            release_decoder=release_decoder, release_prompt_encoder=release_prompt_encoder,
            release_encoder=release_encoder)
    return estimate
