"""Label-consistent backdoor: clean-label poisoning of images first made hard to classify.

Paper: Turner, Tsipras, Madry, "Label-Consistent Backdoor Attacks", 2019, https://arxiv.org/abs/1912.02771
(the authors' code: github.com/MadryLab/label-consistent-backdoor-code). A clean-label attack poisons only
images of the target class and keeps their (correct) labels; on its own the network has no reason to use
the trigger, since the image's content already explains the label. The paper's fix: first make each
poisoned image *hard to classify*, with a bounded adversarial perturbation against a separately trained
surrogate classifier, then add the trigger, so that the trigger is the easiest feature left that explains
the label. At test time the trigger is applied at full amplitude to clean images of other classes.

This module is the attack as one trigger, ``label-consistent``; the poisoning step
(:func:`bench.attacks.poison.poison_training_set`) calls its :meth:`LabelConsistent.poison_images` hook
for the poisoned training images (the engine has no special case for it by name).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from bench.attacks.base import Trigger
from bench.errors import ComponentParamsError
from bench.registry import register_trigger

Corners = Literal["all", "bottom-right"]

#: The authors' 3x3 pattern in a left corner (``poison_attack.py``; +1 white, -1 black), read top to bottom;
#: the right corners hold its mirror image, so the four corners are symmetric under a horizontal flip.
LEFT_PATTERN = ((1, -1, -1), (-1, 1, -1), (1, -1, 1))
#: Side of the corner pattern in pixels.
PATTERN_SIZE = 3
#: Images per PGD batch when perturbing (memory bound only; results do not depend on it).
PGD_BATCH = 512


@register_trigger("label-consistent")
class LabelConsistent(Trigger):
    r"""Label-consistent backdoor (Turner, Tsipras, Madry 2019, https://arxiv.org/abs/1912.02771).

    Use with ``mode: clean-label`` (the only mode it accepts): the poisoned images are target-class
    training images, labels unchanged. Each one is replaced by ``clip(x_adv + amplitude * m, 0, 1)``:
    ``x_adv`` is an untargeted L-inf PGD adversarial example of ``x`` (radius ``eps``, ``steps`` signed-
    gradient steps of ``step_size``, no random start, projected on the ball and on [0, 1]) against a
    *surrogate* classifier, and ``m`` is the authors' 3x3 black (-1) / white (+1) pattern in the corners.
    At test time (:meth:`apply`) the pattern is applied at full amplitude (the paper's evaluation), which
    with clipping stamps white and black pixels.

    The surrogate is a small fixed CNN (three 3x3 convolutions, 16-32-64 channels, global average
    pooling, a linear layer), not the scenario's model: the paper attacks a separately trained model, never
    the victim (the attacker does not control the victim's architecture or training), and one fixed small
    network keeps the attack's cost the same for every model of a scenario and cheap on a CPU. It is
    trained inside the train job on the whole clean training set, seeded by the cell's seed, for
    ``surrogate_epochs`` epochs (Adam, lr 3e-3, batch 128), adversarially (``robust_surrogate``, the paper's
    choice: perturbations of a robust model are more salient and make the image harder to learn; PGD at the
    attack's ``eps``, 5 steps of ``eps / 2``, as in Madry et al.'s adversarial training). The poisoned set
    is reproducible from the seed (bit for bit on the CPU).

    Defaults: ``eps = 16/255`` (the paper's L-inf budgets on CIFAR-10 include 8/255 and 16/255; the
    authors' released ``inf_16`` set is the one reproductions load), ``steps = 100`` and ``step_size =
    1.5/255`` (BackdoorBox's ``LabelConsistent`` reproduction: 100 steps of 1.5 grey levels), the four-corner
    trigger (the paper's improved trigger, which survives horizontal-flip augmentation; ``bottom-right`` is
    the original single corner) at full ``amplitude`` 1 (the authors' ``poisoning_reduced_amplitude: null``
    and BackdoorBench's ``reduced_amplitude: 1``; the paper's reduced-visibility variants use 16/255,
    32/255 and 64/255 during training, full amplitude at test time).

    ``apply: badpatches`` is not applicable (planned ``n/a``): the adversarial perturbation is crafted on
    the whole image against an image-level surrogate, and the trigger is a pattern in the image's corners;
    stamping corner patterns into every patch would need the perturbation and the per-patch pattern to be
    composed differently, which the paper does not define.

    Not reproduced: the paper's other way of making images hard (GAN latent interpolation) and its L2
    budgets. The corner pattern is the authors' mask from ``poison_attack.py`` cell for cell (the paper
    calls it a checkerboard; one cell of each corner breaks the alternation). A defense that sees the
    poisoned set rebuilds it, so it trains the surrogate again (same seed, same images).

    Arguments:
        eps (float): L-inf radius of the adversarial perturbation, in [0, 1]. Default: 16/255.
        steps (int): PGD steps, >= 1. Default: 100.
        step_size (float): PGD step, > 0. Default: 1.5/255.
        amplitude (float): training-time trigger amplitude in (0, 1], the strength. Default: 1.0.
        corners (str): "all" (four corners) or "bottom-right". Default: "all".
        surrogate_epochs (int): epochs of the surrogate's training, >= 1. Default: 5.
        robust_surrogate (bool): train the surrogate adversarially (PGD at ``eps``). Default: True.

    Shape:
        images: ``[N, C, H, W]`` in [0, 1] with ``H, W >= 6`` ("all") or ``>= 3`` ("bottom-right").
        output: ``[N, C, H, W]`` in [0, 1].

    Examples::

        >>> trigger = LabelConsistent(eps=16 / 255, amplitude=32 / 255)
        >>> poisoned = trigger.poison_images(x[idx], y[idx], x, y, seed=0)   # training (clean-label)
        >>> triggered = trigger(test_images)                                  # test: full amplitude
    """

    strength_param: ClassVar[str] = "amplitude"
    #: Poisoning modes this attack accepts (the scenario loader refuses others).
    poison_modes: ClassVar[tuple[str, ...]] = ("clean-label",)

    def __init__(
        self,
        eps: float = 16 / 255,
        steps: int = 100,
        step_size: float = 1.5 / 255,
        amplitude: float = 1.0,
        corners: Corners = "all",
        surrogate_epochs: int = 5,
        robust_surrogate: bool = True,
    ) -> None:
        if not 0.0 <= eps <= 1.0:
            raise ComponentParamsError(f"label-consistent.eps: must be in [0, 1] (16/255 is the default), got {eps}")
        if steps < 1:
            raise ComponentParamsError(f"label-consistent.steps: must be >= 1 PGD step, got {steps}")
        if not 0.0 < step_size <= 1.0:
            raise ComponentParamsError(
                f"label-consistent.step_size: must be in (0, 1] (1.5/255 is the default), got {step_size}"
            )
        if not 0.0 < amplitude <= 1.0:
            raise ComponentParamsError(
                f"label-consistent.amplitude: must be in (0, 1] (1 = full, the paper's reduced "
                f"amplitudes are 16/255, 32/255, 64/255), got {amplitude}"
            )
        if surrogate_epochs < 1:
            raise ComponentParamsError(f"label-consistent.surrogate_epochs: must be >= 1, got {surrogate_epochs}")
        self.eps = eps
        self.steps = steps
        self.step_size = step_size
        self.amplitude = amplitude
        self.corners: Corners = corners
        self.surrogate_epochs = surrogate_epochs
        self.robust_surrogate = robust_surrogate

    @classmethod
    def attack_not_applicable(cls, attack: dict[str, Any]) -> str | None:
        """``apply: badpatches`` is n/a (see the class doc)."""
        if attack.get("apply", "image") != "image":
            return (
                "label-consistent crafts each poisoned image with a whole-image adversarial perturbation against an "
                "image-level surrogate and stamps the image's corners; it has no per-patch form (use apply: image)"
            )
        return None

    # -- the trigger ---------------------------------------------------------------------------------------
    def pattern(self, height: int, width: int) -> torch.Tensor:
        """``[H, W]``: +1 (white), -1 (black) on the corner patterns, 0 elsewhere."""
        need = 2 * PATTERN_SIZE if self.corners == "all" else PATTERN_SIZE
        if height < need or width < need:
            raise ComponentParamsError(
                f"label-consistent.corners: the {self.corners!r} trigger needs images of at least {need}x{need} "
                f"pixels (3x3 patterns that do not overlap), got {height}x{width}"
            )
        left = torch.tensor(LEFT_PATTERN, dtype=torch.float32)
        right = left.flip(-1)
        out = torch.zeros(height, width)
        out[-PATTERN_SIZE:, -PATTERN_SIZE:] = right
        if self.corners == "all":
            out[:PATTERN_SIZE, :PATTERN_SIZE] = left
            out[-PATTERN_SIZE:, :PATTERN_SIZE] = left
            out[:PATTERN_SIZE, -PATTERN_SIZE:] = right
        return out

    def stamp(self, images: torch.Tensor, amplitude: float) -> torch.Tensor:
        """``clip(images + amplitude * pattern, 0, 1)`` on every channel (amplitude 1 stamps the pattern)."""
        mask = self.pattern(images.shape[-2], images.shape[-1]).to(images.device, images.dtype)
        return (images + amplitude * mask).clamp(0.0, 1.0)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """The test-time trigger: the pattern at full amplitude."""
        return self.stamp(images, 1.0)

    def training_trigger(self, images: torch.Tensor) -> torch.Tensor:
        """The training-time trigger: the pattern at ``amplitude``."""
        return self.stamp(images, self.amplitude)

    def touched_mask(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """The corner patterns' pixels."""
        _, h, w = shape
        return self.pattern(h, w) != 0

    # -- the poisoning hook ------------------------------------------------------------------------------------
    def poison_images(
        self, images: torch.Tensor, labels: torch.Tensor, clean_x: torch.Tensor, clean_y: torch.Tensor, seed: int
    ) -> torch.Tensor:
        """The poisoned training images: :meth:`perturb` (adversarial against a surrogate trained on
        ``(clean_x, clean_y)`` with ``seed``), then :meth:`training_trigger`. Called by
        :func:`~bench.attacks.poison.poison_training_set` on the images it poisons, on their device."""
        return self.training_trigger(self.perturb(images, labels, clean_x, clean_y, seed))

    def perturb(
        self, images: torch.Tensor, labels: torch.Tensor, clean_x: torch.Tensor, clean_y: torch.Tensor, seed: int
    ) -> torch.Tensor:
        """``images`` made hard to classify: PGD within ``eps`` (L-inf) against :meth:`surrogate`."""
        if len(images) == 0 or self.eps == 0:
            return images.clone()
        model = self.surrogate(clean_x, clean_y, seed)
        out = [
            pgd(model, images[i : i + PGD_BATCH], labels[i : i + PGD_BATCH], self.eps, self.step_size, self.steps)
            for i in range(0, len(images), PGD_BATCH)
        ]
        return torch.cat(out).to(images.dtype)

    def surrogate(self, clean_x: torch.Tensor, clean_y: torch.Tensor, seed: int) -> nn.Module:
        """The surrogate classifier: :class:`SurrogateCNN` trained on the clean set, seeded by ``seed``
        (weights, batch order), adversarially when ``robust_surrogate``; returned in eval mode, frozen."""
        device = clean_x.device
        classes = int(clean_y.max().item()) + 1
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.manual_seed(seed)
            model = SurrogateCNN(clean_x, classes).to(device)
            optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
            order_gen = torch.Generator().manual_seed(seed)
            for _ in range(self.surrogate_epochs):
                for idx in torch.randperm(len(clean_y), generator=order_gen).split(128):
                    idx = idx.to(device)
                    xb, yb = clean_x[idx], clean_y[idx]
                    if self.robust_surrogate and self.eps > 0:
                        model.eval()
                        xb = pgd(model, xb, yb, self.eps, self.eps / 2, 5)
                    model.train()
                    optimizer.zero_grad(set_to_none=True)
                    F.cross_entropy(model(xb), yb).backward()
                    optimizer.step()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model


class SurrogateCNN(nn.Module):
    """The attacker's small fixed classifier: three 3x3 convolutions (16, 32, 64 channels, the last two
    with stride 2), ReLU, global average pooling and a linear layer, on inputs standardised with the
    training set's per-channel mean and std. Any ``H, W``."""

    def __init__(self, train_x: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        channels = int(train_x.shape[1])
        self.register_buffer("mean", train_x.mean(dim=(0, 2, 3)).view(1, channels, 1, 1).detach().clone())
        self.register_buffer("std", train_x.std(dim=(0, 2, 3)).clamp_min(1e-3).view(1, channels, 1, 1).detach().clone())
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((x - self.mean) / self.std))


def pgd(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, step_size: float, steps: int
) -> torch.Tensor:
    """Untargeted L-inf PGD (Madry et al. 2018) without random start: ``steps`` ascents of the cross-entropy
    by ``step_size * sign(grad)``, each projected on the ``eps`` ball around ``images`` and on [0, 1]."""
    x0 = images.detach().float()
    adv = x0.clone()
    with torch.enable_grad():
        for _ in range(steps):
            adv.requires_grad_(True)
            loss = F.cross_entropy(model(adv), labels)
            (grad,) = torch.autograd.grad(loss, adv)
            adv = adv.detach() + step_size * grad.sign()
            adv = torch.min(torch.max(adv, x0 - eps), x0 + eps).clamp(0.0, 1.0)
    return adv.detach()
