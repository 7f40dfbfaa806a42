"""How much of a diffusion feature is noise? The variance decomposition of paper §3.1 (Fig. 3).

For a timestep ``t`` and one noise draw ``eps`` (the SAME draw everywhere):

* ``F_t   = feat(x_t; t)`` with ``x_t = add_noise(x0, eps, t)`` -- the usual noisy feature,
* ``F_eps = feat(eps; T-1)`` -- the model fed *only the noise* at the last timestep,
* ``F_0   = feat(x0; 0)`` -- the model fed the clean input with *no* noise at all (``x_t = x0``).

A least-squares scalar ``a`` fits ``F_t`` by ``a F_eps`` (residual ``R = F_t - a F_eps``), then a
scalar ``b`` fits ``R`` by ``b F_0``. With ``||.||`` the Frobenius norm over all images, channels
and positions of the **centred** features::

    eps       = 1 - ||R||^2 / ||F_t||^2                      (variance explained by a F_eps)
    x0        = (||R||^2 - ||R - b F_0||^2) / ||F_t||^2       (of the rest, explained by b F_0)
    remaining = ||R - b F_0||^2 / ||F_t||^2                   (explained by neither)

so the three fractions sum to exactly 1 and each lies in ``[0, 1]``. Centring (``center``):
``channel`` (default) subtracts each feature's per-channel mean over images and positions, so a
constant offset per channel -- which the paper's "variance" excludes -- is not counted as explained;
``global`` subtracts one scalar mean, ``none`` uses the raw features (then it is a fraction of the
second moment, not of the variance). Everything is computed from streamed 3x3 Gram statistics, so
any number of images fits in memory.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

import torch
from tqdm import tqdm

Centering = Literal["channel", "global", "none"]
FeatureFn = Callable[[torch.Tensor, int], dict[str, torch.Tensor]]
AddNoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class VarianceFractions:
    """Fractions of ``||F_t||^2`` (centred) explained by the noise features, the clean features, neither."""

    eps: float
    x0: float
    remaining: float
    a: float
    b: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class GramAccumulator:
    """Streams batches of ``(F_t, F_eps, F_0)`` into the centred 3x3 Gram matrix of inner products.

    Keeps only per-channel sums and the raw inner products (float64), so features from any number
    of batches can be pooled exactly.
    """

    def __init__(self, center: Centering = "channel") -> None:
        if center not in ("channel", "global", "none"):
            raise ValueError(f"center must be 'channel', 'global' or 'none', got {center!r}")
        self.center = center
        self.products = torch.zeros(3, 3, dtype=torch.float64)
        self.sums: torch.Tensor | None = None  # (3, C) per-channel sums
        self.count = 0  # values per channel

    def update(self, f_t: torch.Tensor, f_eps: torch.Tensor, f_0: torch.Tensor) -> None:
        """Add one batch; all three are ``(N, C, ...)`` of the same shape."""
        if not (f_t.shape == f_eps.shape == f_0.shape):
            raise ValueError(f"feature shapes differ: F_t {tuple(f_t.shape)}, F_eps {tuple(f_eps.shape)}, "
                             f"F_0 {tuple(f_0.shape)}")
        if f_t.ndim < 2:
            raise ValueError(f"features must be (N, C, ...), got {tuple(f_t.shape)}")
        flat = torch.stack([f.detach().double().cpu().transpose(0, 1).reshape(f.shape[1], -1)
                            for f in (f_t, f_eps, f_0)])  # (3, C, M)
        self.products += torch.einsum("icm,jcm->ij", flat, flat)
        sums = flat.sum(dim=2)
        if self.sums is None:
            self.sums = sums
        elif self.sums.shape != sums.shape:
            raise ValueError(f"channel count changed between batches: {self.sums.shape[1]} vs {sums.shape[1]}")
        else:
            self.sums += sums
        self.count += flat.shape[2]

    def gram(self) -> torch.Tensor:
        """Centred Gram matrix ``G[i, j] = <F_i - mean_i, F_j - mean_j>`` over ``(t, eps, 0)``."""
        if self.sums is None:
            raise ValueError("no features were accumulated")
        if self.center == "none":
            return self.products.clone()
        if self.center == "channel":
            return self.products - self.sums @ self.sums.T / self.count
        totals = self.sums.sum(dim=1)
        n = self.count * self.sums.shape[1]
        return self.products - torch.outer(totals, totals) / n

    def fractions(self) -> VarianceFractions:
        return fractions_from_gram(self.gram())


def fractions_from_gram(gram: torch.Tensor) -> VarianceFractions:
    """The decomposition from the Gram matrix of ``(F_t, F_eps, F_0)`` (see the module docstring).

    ``||R||^2 = G_tt - G_te^2 / G_ee`` and ``||R - b F_0||^2 = ||R||^2 - <R, F_0>^2 / G_00`` with
    ``<R, F_0> = G_t0 - a G_e0``. Rounding can push a squared norm a hair below 0 or above its
    bound; they are clamped so the fractions stay in ``[0, 1]`` and still sum to 1.
    """
    g = gram.double()
    g_tt, g_ee, g_00 = float(g[0, 0]), float(g[1, 1]), float(g[2, 2])
    g_te, g_t0, g_e0 = float(g[0, 1]), float(g[0, 2]), float(g[1, 2])
    if not g_tt > 0:
        raise ValueError("F_t has zero variance: nothing to decompose")
    a = g_te / g_ee if g_ee > 0 else 0.0
    r2 = min(max(g_tt - 2 * a * g_te + a * a * g_ee, 0.0), g_tt)
    r_f0 = g_t0 - a * g_e0
    b = r_f0 / g_00 if g_00 > 0 else 0.0
    rest2 = min(max(r2 - 2 * b * r_f0 + b * b * g_00, 0.0), r2)
    frac_eps = 1.0 - r2 / g_tt
    frac_x0 = (r2 - rest2) / g_tt
    remaining = rest2 / g_tt
    return VarianceFractions(frac_eps, frac_x0, remaining, a, b)


def variance_fractions(f_t: torch.Tensor, f_eps: torch.Tensor, f_0: torch.Tensor,
                       center: Centering = "channel") -> VarianceFractions:
    """The decomposition of one set of features ``(N, C, ...)`` (pure function; see the module docstring)."""
    acc = GramAccumulator(center)
    acc.update(f_t, f_eps, f_0)
    return acc.fractions()


# ---------------------------------------------------------------------------------------------- results
@dataclass
class VarianceResult:
    """Fractions per tap and timestep, with the settings that produced them."""

    rows: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def taps(self) -> list[str]:
        return list(dict.fromkeys(r["tap"] for r in self.rows))

    def series(self, tap: str) -> dict[str, list[float]]:
        """``{"t": [...], "eps": [...], "x0": [...], "remaining": [...]}`` of one tap, sorted by t."""
        rows = sorted((r for r in self.rows if r["tap"] == tap), key=lambda r: r["t"])
        return {key: [r[key] for r in rows] for key in ("t", "eps", "x0", "remaining")}

    def to_dict(self) -> dict:
        return {"config": self.config, "rows": self.rows}

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        return path

    def save_csv(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fields = ["tap", "t", "eps", "x0", "remaining", "a", "b"]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows({k: r[k] for k in fields} for r in self.rows)
        return path

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Stacked areas of the three fractions vs t, one panel per tap (PNG)."""
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt  # noqa: PLC0415

        taps = self.taps()
        fig, axes = plt.subplots(1, len(taps), figsize=(4.2 * len(taps), 3.4), squeeze=False, sharey=True)
        for ax, tap in zip(axes[0], taps):
            s = self.series(tap)
            ax.stackplot(s["t"], s["eps"], s["x0"], s["remaining"],
                         labels=["ε features  feat(ε; T)", "x0 features  feat(x0; 0)", "remaining"],
                         colors=["#d62728", "#1f77b4", "#bbbbbb"], alpha=0.85)
            ax.set_xlim(min(s["t"]), max(s["t"]) if len(s["t"]) > 1 else min(s["t"]) + 1)
            ax.set_ylim(0, 1)
            ax.set_xlabel("timestep t")
            ax.set_title(tap)
        axes[0][0].set_ylabel("fraction of feature variance")
        axes[0][-1].legend(loc="lower right", fontsize=7)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


# ---------------------------------------------------------------------------------------------- drivers
def scaled_linear_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                                 beta_end: float = 0.012) -> torch.Tensor:
    """``alpha_bar_t`` of Stable Diffusion's scaled-linear schedule (for synthetic feature functions)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def ddpm_add_noise(alphas_cumprod: torch.Tensor) -> AddNoise:
    """``add_noise(x0, eps, t) = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` for a given schedule."""

    def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = alphas_cumprod.to(x0.device)[t.long().to(x0.device)].view(-1, *([1] * (x0.ndim - 1))).float()
        return abar.sqrt() * x0.float() + (1 - abar).sqrt() * eps.float()

    return add_noise


def decompose(batches: Iterable[tuple[torch.Tensor, FeatureFn]], ts: Sequence[int], add_noise: AddNoise,
              t_noise: int = 999, draws: int = 1, center: Centering = "channel", seed: int = 0,
              progress: bool = True, total_batches: int | None = None) -> VarianceResult:
    """Run the decomposition over batches of clean inputs ``x0`` with a feature function per batch.

    Args:
        batches: ``(x0, features)`` pairs; ``features(x, t) -> {tap: (B, C, h, w)}`` (the batch's
            prompt is bound inside it). ``x0`` are U-Net inputs (latents for SD).
        ts: timesteps to analyse.
        add_noise: the forward process ``(x0, eps, t) -> x_t``.
        t_noise: timestep at which the pure noise is fed (``T - 1 = 999``).
        draws: noise draws per image (statistics pooled over draws).
        seed: seeds the noise (one CPU generator for the whole run).
    """
    ts = [int(t) for t in ts]
    if not ts:
        raise ValueError("no timesteps given")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    gen = torch.Generator().manual_seed(seed)
    stats: dict[tuple[str, int], GramAccumulator] = {}
    passes = (total_batches or 0) * (1 + draws * (1 + len(ts)))
    bar = tqdm(total=passes or None, desc="variance", unit="pass", disable=not progress, leave=False)
    try:
        for x0, features in batches:
            f_0 = features(x0, 0)
            bar.update(1)
            for _ in range(draws):
                eps = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(x0.device, x0.dtype)
                f_eps = features(eps, t_noise)
                bar.update(1)
                for t in ts:
                    t_vec = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
                    f_t = features(add_noise(x0, eps, t_vec).to(x0.dtype), t)
                    for tap, value in f_t.items():
                        stats.setdefault((tap, t), GramAccumulator(center)).update(value, f_eps[tap], f_0[tap])
                    bar.update(1)
    finally:
        bar.close()
    if not stats:
        raise ValueError("no images were given to the variance analysis")
    rows = [{"tap": tap, "t": t, **acc.fractions().to_dict()} for (tap, t), acc in stats.items()]
    order = {tap: i for i, tap in enumerate(dict.fromkeys(tap for tap, _ in stats))}
    rows.sort(key=lambda r: (order[r["tap"]], r["t"]))
    config = {"ts": ts, "t_noise": t_noise, "draws": draws, "center": center, "seed": seed}
    return VarianceResult(rows, config)


@torch.no_grad()
def noise_variance_analysis(backbone, images: torch.Tensor, ts: Sequence[int], taps: str | Sequence[str] | None = None,
                            prompts: str | Sequence[str] | None = None, unet: torch.nn.Module | None = None,
                            batch_size: int = 4, draws: int = 1, center: Centering = "channel", seed: int = 0,
                            progress: bool = True) -> VarianceResult:
    """The decomposition for a diffusion backbone on images ``(N, 3, H, W)`` in ``[-1, 1]``.

    ``x0`` is the VAE posterior mean (no sampling noise); ``F_eps`` feeds the raw draw at
    ``T - 1``; ``F_0`` feeds ``x0`` at ``t = 0`` without noise. ``unet`` defaults to the frozen
    ``backbone.unet`` (pass a student to analyse it instead). ``taps`` default to the family's feature taps.
    """
    unet = unet if unet is not None else backbone.unet
    selected = backbone.taps.select(taps if taps is not None else backbone.default_feature_taps)
    t_noise = backbone.num_train_timesteps - 1
    n = images.shape[0]
    if n == 0:
        raise ValueError("no images given")
    per_image = [prompts] * n if prompts is None or isinstance(prompts, str) else list(prompts)
    if len(per_image) != n:
        raise ValueError(f"got {len(per_image)} prompts for {n} images")
    dtype = next(unet.parameters()).dtype

    def batches():
        for start in range(0, n, batch_size):
            chunk = images[start:start + batch_size]
            cond = backbone.encode_prompts(per_image[start:start + batch_size], chunk.shape[0]).to(dtype)
            x0 = backbone.encode_images(chunk, sample_posterior=False).float()

            def features(x: torch.Tensor, t: int, cond=cond) -> dict[str, torch.Tensor]:
                feats = backbone.run_taps(x.to(dtype), float(t), cond, selected, denoiser=unet)
                return {k: v.float() for k, v in feats.items()}

            yield x0, features

    result = decompose(batches(), ts, backbone.add_noise, t_noise, draws, center, seed, progress,
                       total_batches=-(-n // batch_size))
    describe = backbone.describe() if hasattr(backbone, "describe") else {}
    result.config.update({"taps": [t.name for t in selected], "num_images": n, "prompts": prompts,
                          "backbone": describe})
    return result
