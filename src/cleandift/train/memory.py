"""A memory estimate for a training run, printed before the (possibly hour-long) model load pays off.

**This is an estimate, not a measurement.** Weights, gradients and optimizer state are exact
parameter arithmetic. Activations are counted by running the student and the heads once on the
``meta`` device (no memory, no compute) and adding up the tensors autograd saves for backward;
attention is counted as a fused (flash / memory-efficient) kernel that saves q, k, v, the output and
the log-sum-exp, which is what PyTorch picks on current GPUs and CPUs. Not included: the allocator's
fragmentation, cuDNN / CUDA context (~0.5-1 GB per GPU), and transient peaks inside single kernels.
bf16 autocast is modelled as bf16 activations everywhere (a slight underestimate: norms stay fp32).
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..heads import HeadConfig, ProjectionHeads
from ..taps import Tap, run_to_taps

GiB = 2**30
BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
#: Optimizer state bytes per trainable parameter (fused Adam keeps the same two fp32 moments).
OPTIMIZER_BYTES = {"adam": 8, "adam-fused": 8, "adam-foreach": 8, "adam8bit": 2}
#: Transient bytes per trainable parameter inside ``optimizer.step()``: foreach Adam materialises
#: ``sqrt(v)`` for every tensor at once; the fused kernel (the ``adam`` default) works in place.
OPTIMIZER_STEP_BYTES = {"adam-foreach": 4}


@dataclass
class ActivationProfile:
    """Saved-for-backward bytes for ONE image, fp32 (scale by 0.5 for bf16)."""

    student: int
    student_checkpointed: int
    heads: int  # for one (image, timestep) pair: multiply by I
    teacher_taps: int  # teacher features kept until the loss, per (image, timestep)
    teacher_peak: int  # live no-grad activations of one teacher sample (skip connections + largest map)
    reached_params: int  # student parameters that get a gradient (those after the last tap do not)


@dataclass
class MemoryEstimate:
    """Byte counts of one configuration; :meth:`total` adds them for a batch."""

    student_params: int
    trainable_params: int
    head_params: int
    teacher_params: int
    frozen_other_params: int  # VAE + text encoder
    teacher_bytes_per_param: int
    profile: ActivationProfile
    batch_size: int
    num_timesteps: int
    rows: list[tuple[str, dict[str, float]]] = field(default_factory=list)

    def components(self, precision: str = "fp32", checkpointing: bool = False, optimizer: str = "adam",
                   teacher_dtype: str | None = None) -> dict[str, float]:
        """GiB per component for one configuration."""
        p = self.profile
        act_scale = 0.5 if precision in ("bf16", "fp16") else 1.0
        student_act = p.student_checkpointed if checkpointing else p.student
        teacher_bpp = BYTES[_dtype(teacher_dtype)] if teacher_dtype else self.teacher_bytes_per_param
        b, i = self.batch_size, self.num_timesteps
        parts = {
            "student weights (fp32)": self.student_params * 4,
            "heads weights (fp32)": self.head_params * 4,
            "gradients (fp32)": self.trainable_params * 4,
            f"optimizer state ({optimizer})": self.trainable_params * OPTIMIZER_BYTES[optimizer],
            "teacher weights": self.teacher_params * teacher_bpp,
            "VAE + text encoder": self.frozen_other_params * 4,
            "student activations": b * student_act * act_scale,
            "head activations": b * i * p.heads * act_scale,
            "teacher features + peak": b * i * (p.teacher_taps + p.teacher_peak) * teacher_bpp / 4,
        }
        if optimizer in OPTIMIZER_STEP_BYTES:
            parts["optimizer step temporaries"] = self.trainable_params * OPTIMIZER_STEP_BYTES[optimizer]
        return {k: v / GiB for k, v in parts.items()}

    def total(self, **kwargs) -> float:
        return sum(self.components(**kwargs).values())

    def report(self, precision: str = "fp32", checkpointing: bool = False, optimizer: str = "adam",
               teacher_dtype: str | None = None) -> str:
        """The component breakdown of the chosen configuration plus the GPU table."""
        parts = self.components(precision, checkpointing, optimizer, teacher_dtype)
        ckpt = ", gradient checkpointing" if checkpointing else ""
        lines = [f"memory estimate (an estimate, see cleandift.train.memory): batch {self.batch_size} x "
                 f"{self.num_timesteps} timesteps, {precision}{ckpt}",
                 f"  parameters: student {self.student_params / 1e6:.1f} M, trainable incl. heads "
                 f"{self.trainable_params / 1e6:.1f} M, heads {self.head_params / 1e6:.1f} M, "
                 f"teacher {self.teacher_params / 1e6:.1f} M"]
        lines += [f"  {name:<30} {gib:8.2f} GiB" for name, gib in parts.items()]
        lines.append(f"  {'total':<30} {sum(parts.values()):8.2f} GiB  (+ ~0.5-1 GiB CUDA context on a GPU)")
        lines.append(f"  activations per image: student {self.profile.student / GiB:.2f} GiB fp32 "
                     f"({self.profile.student_checkpointed / GiB:.2f} with checkpointing), heads "
                     f"{self.num_timesteps * self.profile.heads / GiB:.2f} GiB")
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


# ---------------------------------------------------------------------------------------------- counting
class _SavedBytes:
    """Adds up tensors saved for backward (each storage once), skipping parameters."""

    def __init__(self, params: Sequence[nn.Parameter] = ()) -> None:
        self.params = {id(p) for p in params}
        self.seen: set[int] = set()
        self.total = 0

    def add(self, t: torch.Tensor) -> None:
        base = t._base if t._base is not None else t
        if id(base) in self.params or isinstance(base, nn.Parameter) or id(base) in self.seen:
            return
        self.seen.add(id(base))
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


def _meta_unet(unet: nn.Module) -> nn.Module:
    with torch.device("meta"):
        return type(unet).from_config(unet.config)


def profile_activations(unet: nn.Module, taps: Sequence[Tap], latent_shape: tuple[int, int, int],
                        context_shape: tuple[int, int], head_config: HeadConfig | None) -> ActivationProfile:
    """Measure per-image saved activations on the ``meta`` device (fast, allocates nothing).

    One instrumented student forward gives: all saved bytes; saved bytes and inputs of every unit
    diffusers checkpoints (each resnet and each transformer block: checkpointing keeps the inputs,
    drops what the unit saved, and re-materialises one unit at a time in backward); the down path's
    skip connections (alive during the teacher's no-grad pass); and the parameters reached before the
    last tap (the others get no gradient and no optimizer state).
    """
    meta = _meta_unet(unet)
    meta.train()
    x = torch.zeros(1, *latent_shape, device="meta")
    ctx = torch.zeros(1, *context_shape, device="meta")
    t = torch.tensor(261.0, device="meta", requires_grad=True)

    counter = _SavedBytes(list(meta.parameters()))
    resnet_saved: list[int] = []
    resnet_inputs: list[int] = []
    down_outputs: list[int] = []
    ran: set[int] = set()
    handles = []

    def pre(module, args):
        resnet_inputs.append(sum(_nbytes(a) for a in args))
        resnet_saved.append(-counter.total)

    def post(module, args, out):
        resnet_saved[-1] += counter.total

    for name, module in meta.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a: ran.add(id(m))))
        if name.split(".")[-2:-1] in (["resnets"], ["transformer_blocks"]):
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
        if name.startswith("down_blocks.") and name.count(".") == 1:  # output: (hidden, skip connections)
            handles.append(module.register_forward_hook(lambda m, a, o: down_outputs.append(_skip_bytes(o))))
    try:
        with counter.recording():
            feats = run_to_taps(meta, x, t, ctx, taps)
    finally:
        for h in handles:
            h.remove()
    done = [b for b in resnet_saved if b >= 0]  # the last tap may stop inside a resnet
    student = counter.total
    student_ckpt = student - sum(done) + sum(resnet_inputs[:len(done)]) + max(done, default=0)
    reached = sum(p.numel() for m in meta.modules() if id(m) in ran for p in m.parameters(recurse=False))

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
    teacher_peak = sum(down_outputs) + 2 * max(down_outputs, default=0)
    return ActivationProfile(student, student_ckpt, heads_bytes, tap_bytes, teacher_peak, reached)


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


def estimate_memory(backbone, taps: Sequence[Tap], image_size: int, batch_size: int, num_timesteps: int,
                    head_config: HeadConfig | None, student_timestep_learned: bool = True) -> MemoryEstimate:
    """Estimate the training memory for ``backbone`` at ``image_size`` px (see module docstring)."""
    unet = backbone.unet
    c, h, w = backbone.input_shape((image_size, image_size))
    context = _context_shape(backbone)
    profile = profile_activations(unet, taps, (c, h, w), context, head_config)
    head_params = 0
    if head_config is not None:
        with torch.device("meta"):
            head_params = count_params(ProjectionHeads({tp.name: tp.channels for tp in taps}, head_config))
    student = count_params(unet)
    teacher_bpp = BYTES.get(next(unet.parameters()).dtype, 4)
    other = count_params(getattr(backbone, "vae", None)) + count_params(getattr(backbone, "text_encoder", None))
    trainable = profile.reached_params + head_params + int(student_timestep_learned)
    return MemoryEstimate(student, trainable, head_params, student, other, teacher_bpp, profile, batch_size,
                          num_timesteps)


def _context_shape(backbone) -> tuple[int, int]:
    tokenizer = getattr(backbone, "tokenizer", None)
    length = int(getattr(tokenizer, "model_max_length", 77) or 77) if tokenizer is not None else 77
    dim = getattr(backbone.unet.config, "cross_attention_dim", None) or 768
    dim = dim[0] if isinstance(dim, (tuple, list)) else dim
    return (min(length, 77), int(dim))
