"""Spatial feature-guided masking (HyperKD): mask the patches the teacher finds salient more often.

Uniform random masking spends most of an image's mask budget on homogeneous fields and water, whose pixels a
student reconstructs from any neighbour; masking the patches where the teacher's features stand out makes the
student infer the structured ones. Pure saliency masking would, in turn, always hide the same objects, so the
masking probability mixes both (HyperKD's spatial feature-guided masking):

    p_i = (1 - g) / n + g * s_i / sum_j s_j        over the n valid patches, g = ``guided_ratio``

where s_i is patch i's saliency (``patch_saliency``: how far its teacher feature lies from the image's mean
feature). Exactly k = round(mask_ratio * n) patches are drawn without replacement with these probabilities by
the Gumbel-top-k trick (the k largest of log p_i + G_i, G_i standard Gumbel): the same exact-count, padding-
sparing selection as the other recipes (``cdkd.distill.corruption.select_patches``), with the order given by
the keys. The Gumbel draws come from the per-sample seed the data pipeline draws (``PatchDraws``' ``noise_seed``,
a pure function of the sample number), so ``--resume`` and DDP see the same masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cdkd.distill.corruption import seeded_noise, select_patches

__all__ = ["guided_mask", "gumbel_noise", "hidden_patches", "mask_saliency_rank", "patch_saliency"]


def gumbel_noise(seeds: torch.Tensor, num_patches: int, device: torch.device) -> torch.Tensor:
    """(B, N) standard Gumbel draws, image b's from the seed ``seeds[b]`` (``PatchDraws``' per-sample
    ``noise_seed``): standard normals through the normal CDF are uniform, and -log(-log(u)) is Gumbel."""
    u = torch.special.ndtr(seeded_noise(seeds, (num_patches,), device)).clamp(1e-7, 1 - 1e-7)
    return -torch.log(-torch.log(u))


def patch_saliency(features: torch.Tensor, patch_valid: torch.Tensor) -> torch.Tensor:
    """(B, N, C) teacher tokens -> (B, N) saliency: the distance of each layer-normalised token from the mean of
    its image's valid tokens (0 on invalid patches). Distinct structures score high, the dominant cover low."""
    f = F.layer_norm(features.float(), features.shape[-1:])
    w = patch_valid.to(f.dtype).unsqueeze(-1)
    mean = (f * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1.0)
    return (f - mean).norm(dim=-1) * patch_valid.to(f.dtype)


def guided_mask(
    saliency: torch.Tensor, patch_valid: torch.Tensor, noise: torch.Tensor, mask_ratio: float, guided_ratio: float
) -> torch.Tensor:
    """(B, N) bool mask: exactly round(mask_ratio * n_valid) valid patches per image, drawn without replacement
    with probability (1 - guided_ratio) / n + guided_ratio * s_i / sum s (see the module docstring); ``noise``
    (B, N) standard Gumbel draws. Padding is never masked. An image whose saliency is all zero is masked
    uniformly."""
    s = saliency.float().clamp_min(0) * patch_valid
    valid = patch_valid.float()
    n = valid.sum(1, keepdim=True).clamp_min(1.0)
    total = s.sum(1, keepdim=True)
    share = torch.where(total > 0, s / total.clamp_min(1e-12), valid / n)
    prob = (1.0 - guided_ratio) * valid / n + guided_ratio * share
    keys = torch.where(patch_valid, torch.log(prob.clamp_min(1e-30)) + noise.float(), torch.full_like(prob, -1e30))
    order = torch.argsort(torch.argsort(keys, dim=1, descending=True), dim=1)  # rank: 0 = picked first
    return select_patches(order, patch_valid, mask_ratio, 0.0)[0]


def hidden_patches(masked: torch.Tensor, patch_valid: torch.Tensor) -> torch.Tensor:
    """The patches a visible-only encoder drops: ``masked`` plus, per image, enough padding patches that every
    image in the batch drops the same number (the dense batching of visible tokens needs equal counts).

    Images with padding have fewer valid patches, hence fewer masked ones; hiding some of their padding (which
    carries nothing) evens the counts without masking a valid patch more than the ratio says.
    """
    k = masked.sum(1)
    extra = k.max() - k
    pad = ~patch_valid & ~masked
    if bool((pad.sum(1) < extra).any()):
        raise RuntimeError("not enough padding to even out the hidden patch counts")  # impossible for ratio < 1
    return masked | (pad & (torch.cumsum(pad.long(), dim=1) <= extra[:, None]))


def mask_saliency_rank(saliency: torch.Tensor, masked: torch.Tensor, patch_valid: torch.Tensor) -> torch.Tensor:
    """Mean percentile (0..1) of the masked patches' saliency among their image's valid patches, averaged over
    the batch: 0.5 for uniform masking, toward 1 as masking follows saliency. A monitor, not a loss."""
    s = torch.where(patch_valid, saliency.float(), torch.full_like(saliency.float(), -1e30))
    rank = torch.argsort(torch.argsort(s, dim=1), dim=1).float()  # invalid patches take the lowest ranks
    n_valid = patch_valid.sum(1, keepdim=True).float()
    pct = (rank - (patch_valid.shape[1] - n_valid)) / (n_valid - 1).clamp_min(1.0)
    m = masked & patch_valid
    per_image = (pct * m).sum(1) / m.sum(1).clamp_min(1)
    return per_image[m.any(1)].mean() if bool(m.any()) else saliency.new_tensor(0.5)
