"""Training, sampling and the realism score of the DCGAN of FedGAN (paper 002;
:mod:`synthlearn.models.dcgan`).

:func:`train_dcgan_epochs` is the loop of Radford et al. (2016) written out: per batch one discriminator step on
real images vs detached fakes, then one generator step with the non-saturating loss ``-log D(G(z))`` (Goodfellow
et al. 2014), both binary cross-entropy on logits, both Adam. It takes and returns the two optimizers, so a site of
a FedGAN round may keep its Adam moments across rounds or start fresh each round (the caller decides). Every random
draw (data order, ``z``, fake labels, dropout) comes from the ``seed``: the same seed gives the same weights.

:func:`realism_score` is paper 002's measure: the mean probability a discriminator trained on real vs generated
images gives to a set of images (0.43 for its 3-site federation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from synthlearn.models.dcgan import DCGANConfig, DCGANDiscriminator, DCGANGenerator
from synthlearn.training.seeding import derive_seed, torch_generator


def _check_images(images: torch.Tensor, labels: torch.Tensor | None, cfg: DCGANConfig) -> None:
    c, s = cfg.channels, cfg.image_size
    if images.ndim != 4 or tuple(images.shape[1:]) != (c, s, s):
        raise ValueError(f"images must be (N, {c}, {s}, {s}), found shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images must hold at least one image, found N = 0")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point in [-1, 1], found {images.dtype}")
    if labels is None:
        if cfg.num_classes > 0:
            raise ValueError(f"cfg.num_classes = {cfg.num_classes} (class-conditional) but labels is None; pass "
                             f"labels (N,) long or use num_classes = 0")
        return
    if cfg.num_classes == 0:
        raise ValueError("labels were given but cfg.num_classes = 0 (unconditional); pass labels=None or set "
                         "num_classes > 0")
    if labels.shape != (images.shape[0],) or labels.dtype != torch.long:
        raise ValueError(f"labels must be ({images.shape[0]},) long, found shape {tuple(labels.shape)} "
                         f"{labels.dtype}")


def make_dcgan_optimizer(net: torch.nn.Module, cfg: DCGANConfig) -> torch.optim.Adam:
    """DCGAN's optimizer: ``Adam(lr, betas=(beta1, 0.999))`` over ``net``'s parameters."""
    return torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))


def train_dcgan_epochs(
    gen: DCGANGenerator,
    disc: DCGANDiscriminator,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    cfg: DCGANConfig,
    *,
    epochs: int,
    seed: int,
    opt_g: torch.optim.Optimizer | None = None,
    opt_d: torch.optim.Optimizer | None = None,
    progress: bool = False,
) -> tuple[dict[str, list[float]], torch.optim.Optimizer, torch.optim.Optimizer]:
    """Train ``gen`` and ``disc`` in place for ``epochs`` passes over ``images`` (left in train mode).

    Per batch of real images ``x`` (labels ``y``): the discriminator step minimises
    ``BCE(D(x), 1 - s) + BCE(D(G(z).detach()), 0)``; the generator step minimises ``BCE(D(G(z)), 1)`` on the same
    fakes. Conditional (``cfg.num_classes > 0``): the fakes' classes are drawn with replacement from the real
    batch's labels, so they follow the site's class frequencies.

    Args:
        gen, disc: networks built from ``cfg`` (on any device; the batches follow ``gen``'s).
        images: ``(N, channels, S, S)`` real images in ``[-1, 1]``; ``N`` may be smaller than ``cfg.batch_size``
            (one short batch) and the last batch of an epoch may be short.
        labels: ``(N,)`` long classes when ``cfg.num_classes > 0``, else ``None``.
        cfg: :class:`DCGANConfig` (``batch_size``, ``lr``, ``beta1``, ``label_smoothing``, ``latent_dim``).
        epochs: passes over ``images`` (>= 0).
        seed: data order, ``z``, fake labels and dropout of this call are drawn from it.
        opt_g, opt_d: optimizers to continue (e.g. a site keeping its Adam moments across FedGAN rounds); new
            ``Adam(cfg.lr, betas=(cfg.beta1, 0.999))`` ones when ``None``.
        progress: show a tqdm bar over the epochs.

    Returns:
        ``(history, opt_g, opt_d)``: ``history`` holds per-epoch means over the images of ``d`` (discriminator loss),
        ``g`` (generator loss), ``d_real`` and ``d_fake`` (mean sigmoid outputs of the discriminator on the real
        images and on the fakes during its step); the two optimizers used.
    """
    _check_images(images, labels, cfg)
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, found {epochs}")
    device = next(gen.parameters()).device
    opt_g = make_dcgan_optimizer(gen, cfg) if opt_g is None else opt_g
    opt_d = make_dcgan_optimizer(disc, cfg) if opt_d is None else opt_d
    rng = torch_generator(seed, "dcgan-train")
    n, bs = images.shape[0], cfg.batch_size
    real_target = 1.0 - cfg.label_smoothing
    history: dict[str, list[float]] = {"d": [], "g": [], "d_real": [], "d_fake": []}
    gen.train()
    disc.train()
    # dropout draws from torch's global generator: fork it so the run is reproducible and the caller's is untouched
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "dcgan-dropout"))
        for _ in tqdm(range(epochs), desc="dcgan", unit="epoch", leave=False, disable=not progress):
            sums = dict.fromkeys(history, 0.0)
            order = torch.randperm(n, generator=rng)
            for start in range(0, n, bs):
                idx = order[start:start + bs]
                b = len(idx)
                x = images[idx].to(device)
                y = None if labels is None else labels[idx].to(device)
                z = torch.randn(b, cfg.latent_dim, generator=rng).to(device)
                y_fake = None if y is None else y[torch.randint(b, (b,), generator=rng).to(device)]
                fake = gen(z, y_fake)

                # discriminator: real -> 1 - s, fake (no gradient into the generator) -> 0
                opt_d.zero_grad(set_to_none=True)
                logit_real = disc(x, y)
                logit_fake = disc(fake.detach(), y_fake)
                loss_d = (F.binary_cross_entropy_with_logits(logit_real, torch.full_like(logit_real, real_target))
                          + F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake)))
                loss_d.backward()
                opt_d.step()

                # generator, non-saturating: maximise log D(G(z)) rather than minimise log(1 - D(G(z)))
                opt_g.zero_grad(set_to_none=True)
                logit_gen = disc(fake, y_fake)
                loss_g = F.binary_cross_entropy_with_logits(logit_gen, torch.ones_like(logit_gen))
                loss_g.backward()
                opt_g.step()

                sums["d"] += float(loss_d.detach()) * b
                sums["g"] += float(loss_g.detach()) * b
                sums["d_real"] += float(torch.sigmoid(logit_real.detach()).sum())
                sums["d_fake"] += float(torch.sigmoid(logit_fake.detach()).sum())
            for key, total in sums.items():
                history[key].append(total / n)
    for key, values in history.items():
        if any(not math.isfinite(v) for v in values):
            raise FloatingPointError(f"DCGAN training diverged: non-finite {key} loss {values}; lower cfg.lr")
    return history, opt_g, opt_d


@torch.no_grad()
def sample_dcgan(gen: DCGANGenerator, n: int, *, labels: torch.Tensor | None = None, seed: int = 0,
                 batch_size: int = 64) -> torch.Tensor:
    """Draw ``n`` images from ``gen`` in eval mode (BatchNorm with its running statistics), without gradients.

    ``z`` for all ``n`` images is drawn first from ``seed``, so the images do not depend on ``batch_size``.
    ``gen``'s train/eval mode is restored afterwards.

    Args:
        gen: a :class:`DCGANGenerator`.
        n: images to draw (>= 0).
        labels: ``(n,)`` long classes for a conditional generator, else ``None``.
        seed: seed of ``z``.
        batch_size: images generated together.

    Returns:
        ``(n, channels, S, S)`` float images in ``[-1, 1]`` on the CPU.
    """
    cfg = gen.cfg
    if n < 0 or batch_size < 1:
        raise ValueError(f"n >= 0 and batch_size >= 1 expected, found n = {n}, batch_size = {batch_size}")
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"labels must be ({n},) long, found shape {tuple(labels.shape)}")
    if (labels is None) != (cfg.num_classes == 0):
        raise ValueError(f"labels (n,) long are needed exactly when the generator is conditional "
                         f"(num_classes = {cfg.num_classes}), found labels={'None' if labels is None else 'given'}")
    device = next(gen.parameters()).device
    z = torch.randn(n, cfg.latent_dim, generator=torch_generator(seed, "dcgan-sample"))
    was_training = gen.training
    gen.eval()
    try:
        out = [gen(z[i:i + batch_size].to(device), None if labels is None else labels[i:i + batch_size].to(device))
               .cpu() for i in range(0, n, batch_size)]
    finally:
        gen.train(was_training)
    return torch.cat(out) if out else torch.empty(0, cfg.channels, cfg.image_size, cfg.image_size)


@torch.no_grad()
def realism_score(disc: DCGANDiscriminator, images: torch.Tensor, *, labels: torch.Tensor | None = None,
                  batch_size: int = 64) -> float:
    """Paper 002's realism score: the mean probability ``sigmoid(D(x))`` that ``disc`` (trained on real vs
    generated images) gives to ``images``; 1 = all judged real, 0 = all judged fake.

    Args:
        disc: a :class:`DCGANDiscriminator`, evaluated in eval mode (its mode is restored afterwards).
        images: ``(N, channels, S, S)`` in ``[-1, 1]``, ``N >= 1``.
        labels: ``(N,)`` long classes for a conditional discriminator, else ``None``.
        batch_size: images scored together.

    Returns:
        The mean in ``[0, 1]``.
    """
    _check_images(images, labels, disc.cfg)
    device = next(disc.parameters()).device
    was_training = disc.training
    disc.eval()
    total = 0.0
    try:
        for i in range(0, images.shape[0], batch_size):
            y = None if labels is None else labels[i:i + batch_size].to(device)
            total += float(torch.sigmoid(disc(images[i:i + batch_size].to(device), y)).sum())
    finally:
        disc.train(was_training)
    return total / images.shape[0]


__all__ = ["make_dcgan_optimizer", "realism_score", "sample_dcgan", "train_dcgan_epochs"]
