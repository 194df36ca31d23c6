"""Input-aware dynamic backdoor: a generator network makes every image its own trigger.

Paper: Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS 2020, https://arxiv.org/abs/2010.08138;
the authors' release github.com/VinAIResearch/input-aware-backdoor-attack-release (``train.py``,
``config.py``, ``networks/models.py``), whose defaults BackdoorBench's ``inputaware`` keeps. A learned trigger
(:attr:`bench.attacks.base.Trigger.learned`): the train job trains it with the classifier and stores its
state beside the model; evaluations and defenses restore it (:func:`bench.jobs.restore_trigger`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench.attacks.base import JointTraining, Trigger
from bench.attacks.poison import backdoor_labels
from bench.errors import ComponentParamsError
from bench.registry import register_trigger

#: The release's ``EPSILON`` (diversity-loss denominator, and the pattern's tanh scaling).
EPSILON = 1e-7
#: The release's optimiser for the generator and the mask network: Adam with these betas.
ADAM_BETAS = (0.5, 0.9)
#: The mask network's learning-rate schedule (``schedulerM_milestones``, ``schedulerM_lambda``), in epochs.
MASK_MILESTONES = (10, 20)
MASK_GAMMA = 0.1
#: Added under the diversity loss's square root (its gradient at 0 is infinite); 1e-6 of a pixel's rms.
SQRT_FLOOR = 1e-12


class _ConvBlock(nn.Sequential):
    """The release's ``Conv2dBlock``: 3x3 convolution, BatchNorm (momentum 0.05), ReLU (or none)."""

    def __init__(self, cin: int, cout: int, relu: bool = True) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout, eps=1e-5, momentum=0.05))
        if relu:
            self.append(nn.ReLU(inplace=True))


class EncoderDecoder(nn.Sequential):
    """The release's ``Generator``: ``steps`` times (two conv blocks, 2x2 max-pool) with ``channels`` doubling,
    a middle block, ``steps`` times (bilinear 2x upsampling, two conv blocks) back to ``out_channels``; output
    ``tanh(.) / (2 + eps) + 0.5`` in (0, 1). MNIST: channels 16, steps 2; CIFAR-10 / GTSRB: 32, 3. Sides
    not divisible by ``2 ** steps`` are padded (replicate) and the output cropped back."""

    def __init__(self, in_channels: int, out_channels: int, channels: int, steps: int) -> None:
        super().__init__()
        self.steps = steps
        current, width = in_channels, channels
        for step in range(steps):
            self.add_module(f"down_{2 * step}", _ConvBlock(current, width))
            self.add_module(f"down_{2 * step + 1}", _ConvBlock(width, width))
            self.add_module(f"pool_{step}", nn.MaxPool2d(2, 2))
            current = width
            if step < steps - 1:
                width *= 2
        self.add_module("middle", _ConvBlock(width, width))
        current = width
        for step in range(steps):
            nxt = out_channels if step == steps - 1 else current // 2
            self.add_module(f"upsample_{step}", nn.Upsample(scale_factor=2, mode="bilinear"))
            self.add_module(f"up_{2 * step}", _ConvBlock(current, current))
            self.add_module(f"up_{2 * step + 1}", _ConvBlock(current, nxt, relu=step < steps - 1))
            current = nxt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        unit = 2**self.steps
        pad_h, pad_w = -h % unit, -w % unit
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        out = super().forward(x)[..., :h, :w]
        return torch.tanh(out) / (2 + EPSILON) + 0.5


def threshold(mask: torch.Tensor) -> torch.Tensor:
    """The release's ``netM.threshold``: a steep step at 0.5, ``tanh(20 m - 10) / (2 + eps) + 0.5``."""
    return torch.tanh(mask * 20 - 10) / (2 + EPSILON) + 0.5


def diversity(x1: torch.Tensor, x2: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """The paper's diversity loss (Eq. 3), the release's way: mean over pairs of
    ``rms(x1 - x2) / (rms(p1 - p2) + eps)`` (rms over every pixel and channel of one image). The mean square
    gets ``SQRT_FLOOR`` before the root: two equal patterns would otherwise give an infinite gradient (NaN)."""
    images = (x1 - x2).pow(2).mean(dim=(1, 2, 3)).sqrt()
    patterns = ((p1 - p2).pow(2).mean(dim=(1, 2, 3)) + SQRT_FLOOR).sqrt()
    return (images / (patterns + EPSILON)).mean()


@register_trigger("inputaware")
class InputAware(Trigger):
    r"""Input-aware dynamic trigger (Nguyen & Tran, NeurIPS 2020, https://arxiv.org/abs/2010.08138).

    Two encoder-decoder networks of the image: a pattern generator ``g`` (as many channels as the image) and a
    mask generator ``m`` (one channel). The triggered image is ``x * (1 - M(x)) + g(x) * M(x)`` with
    ``M = threshold(m)``, a steep step at 0.5 (:func:`threshold`): every image gets its own pattern and mask.

    Training, as the authors' release does it (``train.py``), in the train job:

    1. the mask network alone, ``mask_epochs`` epochs over the training set in pairs of images ``(x, x')``
       (two shuffles), Adam (lr ``lr_m``, betas 0.5, 0.9; lr x0.1 after epochs 10 and 20) on
       ``lambda_norm * mean(relu(M(x) - mask_density)) + lambda_div * L_div(x, x', M(x), M(x'))``, then frozen;
    2. the classifier and ``g`` jointly, every batch of the scenario's training: its first
       ``floor(rho_b * B)`` images (``rho_b`` = the cell's poison rate, paper 0.1) get their own trigger and
       the backdoor label (the target; ``(y + 1) mod C`` with ``mode: all-to-all``), the next
       ``floor(cross_rate * B)`` (``rho_c``, paper 0.1) the pattern and mask made from *another* training
       image and keep their labels (cross-trigger mode: a trigger only works on its own image), the rest stay
       clean. Loss: cross-entropy of the classifier on the whole batch + ``lambda_div * L_div`` with
       ``L_div = rms(x - x') / rms(g(x) - g(x'))`` over the backdoor images and the other images (Eq. 3), so
       ``g`` cannot collapse to one fixed pattern. The classifier steps with the scenario's optimizer, ``g``
       with Adam (lr ``lr_g``, betas 0.5, 0.9) after it.

    At test time each image gets the trigger the trained (frozen, eval-mode) networks make for it.

    Departures from the release: the batch order, partner images and initial weights come from the cell's
    seed and the trigger's ``seed``; the partner image of each row is drawn at random from the training set
    (the release zips a second shuffled loader); the release never zeroes ``g``'s gradients, which therefore
    accumulate over all steps: we zero them after every step, as its mask network and any optimiser loop do;
    images are the benchmark's [0, 1] tensors, so the pattern needs no normalisation; the generator's
    learning-rate schedule (x0.1 at epochs 200-500 of 1000) is left out (our trainings are far shorter);
    sides not divisible by ``2 ** steps`` are padded. ``apply: badpatches`` is n/a (the trigger is a learned
    function of the whole image, with no per-patch form) and ``mode: clean-label`` refused (the attack
    relabels; the paper has no clean-label variant).

    Arguments:
        cross_rate (float): rho_c, the fraction of each batch in cross-trigger mode, in [0, 1). Default: 0.1.
        lambda_div (float): weight of the diversity loss (both stages, >= 0). Default: 1.0.
        lambda_norm (float): weight of the mask's norm loss (> 0). Default: 100.0.
        mask_density (float): the mask's target density, in (0, 1]; the strength knob. Default: 0.032.
        mask_epochs (int): epochs of mask training before the joint training (>= 0). Default: 25.
        channels (int): first width of both encoder-decoders (>= 1). Default: 16 (the release's MNIST).
        steps (int): down/up-sampling steps of both encoder-decoders (>= 1). Default: 2 (MNIST; 3 for
            CIFAR-10 and GTSRB in the release).
        lr_g (float): the pattern generator's learning rate (> 0). Default: 0.01.
        lr_m (float): the mask network's learning rate (> 0). Default: 0.01.
        seed (int): seed of both networks' initial weights and of the partner draws. Default: 0.

    Shape:
        images: ``[N, C, H, W]`` in [0, 1]; the networks are built for ``C`` on first use.
        output: ``[N, C, H, W]`` in [0, 1].

    Examples::

        >>> trigger = InputAware()               # untrained: a random but deterministic generator
        >>> trigger.load_state_dict(stored)       # what the train job stored
        >>> triggered = trigger(images)
    """

    strength_param: ClassVar[str] = "mask_density"
    learned: ClassVar[bool] = True
    #: The release's all2one and all2all; it relabels, so no clean-label (the scenario loader refuses it).
    poison_modes: ClassVar[tuple[str, ...]] = ("dirty", "all-to-all")

    def __init__(
        self,
        cross_rate: float = 0.1,
        lambda_div: float = 1.0,
        lambda_norm: float = 100.0,
        mask_density: float = 0.032,
        mask_epochs: int = 25,
        channels: int = 16,
        steps: int = 2,
        lr_g: float = 0.01,
        lr_m: float = 0.01,
        seed: int = 0,
    ) -> None:
        checks = [
            ("cross_rate", 0 <= cross_rate < 1, "must be in [0, 1) (the fraction of each batch in cross mode)"),
            ("lambda_div", lambda_div >= 0 and math.isfinite(lambda_div), "must be a finite number >= 0"),
            ("lambda_norm", lambda_norm > 0 and math.isfinite(lambda_norm), "must be a finite number > 0"),
            ("mask_density", 0 < mask_density <= 1, "must be in (0, 1] (the fraction of pixels the mask covers)"),
            ("mask_epochs", mask_epochs >= 0, "must be >= 0"),
            ("channels", channels >= 1, "must be >= 1"),
            ("steps", 1 <= steps <= 6, "must be in 1..6 (down/up-sampling steps)"),
            ("lr_g", lr_g > 0 and math.isfinite(lr_g), "must be a finite number > 0"),
            ("lr_m", lr_m > 0 and math.isfinite(lr_m), "must be a finite number > 0"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ComponentParamsError(f"inputaware.{name}: {rule}, got {locals()[name]!r}")
        self.cross_rate = cross_rate
        self.lambda_div = lambda_div
        self.lambda_norm = lambda_norm
        self.mask_density = mask_density
        self.mask_epochs = mask_epochs
        self.channels = channels
        self.steps = steps
        self.lr_g = lr_g
        self.lr_m = lr_m
        self.seed = seed
        self.generator: EncoderDecoder | None = None
        self.mask: EncoderDecoder | None = None

    @classmethod
    def attack_not_applicable(cls, attack: dict[str, Any]) -> str | None:
        if attack.get("apply", "image") == "badpatches":
            return (
                "trigger 'inputaware' is a learned function of the whole image (its generator makes each image's "
                "pattern and mask), so it has no per-patch form: use apply: image"
            )
        if attack.get("objective"):
            return "trigger 'inputaware' trains with its own objective and cannot take a qcb objective too"
        return None

    # -- the networks ---------------------------------------------------------------------------------
    def networks(self, in_channels: int, device: torch.device | str = "cpu") -> tuple[EncoderDecoder, EncoderDecoder]:
        """The pattern generator and the mask network for ``in_channels``-channel images, built on first use
        with weights drawn from ``seed`` (the caller's random state is left as it was)."""
        if self.generator is None or self.mask is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self.generator = EncoderDecoder(in_channels, in_channels, self.channels, self.steps)
                self.mask = EncoderDecoder(in_channels, 1, self.channels, self.steps)
            self.generator.eval()
            self.mask.eval()
        first = self.generator.get_submodule("down_0")[0]
        if first.in_channels != in_channels:
            raise ComponentParamsError(
                f"inputaware: the trigger's networks take {first.in_channels}-channel images, got {in_channels}"
            )
        self.generator.to(device)
        self.mask.to(device)
        return self.generator, self.mask

    def pattern_and_mask(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``g(x)`` ``[N, C, H, W]`` and the thresholded mask ``M(x)`` ``[N, 1, H, W]`` (gradients flow
        through ``g`` when it requires them; the mask network is frozen in eval mode outside its training)."""
        gen, mask = self.networks(images.shape[1], images.device)
        return gen(images), threshold(mask(images))

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        gen, mask = self.networks(images.shape[1], images.device)
        modes = gen.training, mask.training
        gen.eval()
        mask.eval()
        try:
            with torch.no_grad():
                pattern, m = gen(images.float()), threshold(mask(images.float()))
        finally:
            gen.train(modes[0])
            mask.train(modes[1])
        return (images + (pattern - images) * m).clamp(0.0, 1.0).to(images.dtype)

    def cross(self, images: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        """Cross-trigger samples: ``images`` with the pattern and mask made from ``others`` (same shape)."""
        pattern, m = self.pattern_and_mask(others)
        return (images + (pattern - images) * m).clamp(0.0, 1.0)

    def touched_mask(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """Pixels the mask covers (``M >= 0.5``) on the default probes: the mask is soft, so every pixel
        changes by a little and the default "changed at all" would report the whole image."""
        c, h, w = shape
        probe = torch.stack([torch.zeros(c, h, w), torch.ones(c, h, w), torch.full((c, h, w), 0.5)])
        _, mask = self.networks(c)
        mask.eval()
        with torch.no_grad():
            return (threshold(mask(probe)) >= 0.5).any(dim=0)[0]

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.generator is None or self.mask is None:
            return {}
        state = {f"generator.{k}": v.detach().clone() for k, v in self.generator.state_dict().items()}
        state.update({f"mask.{k}": v.detach().clone() for k, v in self.mask.state_dict().items()})
        state["in_channels"] = torch.tensor(self.generator.get_submodule("down_0")[0].in_channels)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "in_channels" not in state:
            raise ComponentParamsError("inputaware: the stored trigger state has no in_channels entry")
        gen, mask = self.networks(int(state["in_channels"]))
        gen.load_state_dict({k[len("generator.") :]: v for k, v in state.items() if k.startswith("generator.")})
        mask.load_state_dict({k[len("mask.") :]: v for k, v in state.items() if k.startswith("mask.")})
        gen.eval()
        mask.eval()

    # -- training -------------------------------------------------------------------------------------
    def train_mask(self, x: torch.Tensor, batch_size: int, seed: int) -> dict[str, float]:
        """Stage 1: train the mask network alone on ``x`` (see the class doc), then freeze it; returns the
        final norm and diversity terms and the mean mask density on the last batch."""
        _, mask = self.networks(x.shape[1], x.device)
        mask.train()
        mask.requires_grad_(True)
        optimizer = torch.optim.Adam(mask.parameters(), lr=self.lr_m, betas=ADAM_BETAS)
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(MASK_MILESTONES), MASK_GAMMA)
        gen = torch.Generator().manual_seed(seed)
        norm = div = density = torch.zeros(())
        for _ in range(self.mask_epochs):
            first, second = (torch.randperm(len(x), generator=gen).to(x.device) for _ in range(2))
            for begin in range(0, len(x), batch_size):
                x1, x2 = x[first[begin : begin + batch_size]], x[second[begin : begin + batch_size]]
                m1, m2 = threshold(mask(x1)), threshold(mask(x2))
                norm = F.relu(m1 - self.mask_density).mean()
                div = diversity(x1, x2, m1, m2)
                loss = self.lambda_norm * norm + self.lambda_div * div
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                density = m1.detach().mean()
            schedule.step()
        mask.eval()
        mask.requires_grad_(False)
        last = {"mask_norm_loss": norm, "mask_div_loss": div, "mask_density": density}
        return {k: float(v.detach()) for k, v in last.items()}

    def joint_training(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        target: int | None,
        rate: float,
        seed: int,
        mode: str,
        num_classes: int,
        train_cfg: dict[str, Any],
    ) -> JointTraining:
        if mode not in self.poison_modes:
            raise ComponentParamsError(
                f"inputaware: poisons in mode {' or '.join(self.poison_modes)} (it relabels), got mode {mode!r}"
            )
        start = time.perf_counter()
        metrics: dict[str, Any] = {}
        if self.mask_epochs > 0:
            metrics.update(self.train_mask(x, int(train_cfg["batch_size"]), seed))
        else:
            self.networks(x.shape[1], x.device)[1].requires_grad_(False)
        metrics["trigger_mask_seconds"] = time.perf_counter() - start
        objective = _JointObjective(self, x, target, rate, num_classes, seed)
        return JointTraining(x, y, objective, objective.finish, metrics)


@dataclass
class JointBatch:
    """A composed training batch: rows ``[0, n_backdoor)`` carry their own trigger and the backdoor label,
    rows ``[n_backdoor, n_backdoor + n_cross)`` the trigger of ``others[:n_cross]`` and their true label, the
    rest are clean. ``others``: the partner images; ``own_pattern`` / ``other_pattern``: ``g`` of the backdoor
    rows and of ``others``."""

    inputs: torch.Tensor
    labels: torch.Tensor
    n_backdoor: int
    n_cross: int
    others: torch.Tensor
    own_pattern: torch.Tensor
    other_pattern: torch.Tensor


class _JointObjective:
    """Stage 2's loss for :func:`bench.train.fit`: see :class:`InputAware`; ``after_step`` steps ``g``."""

    def __init__(
        self, trigger: InputAware, x: torch.Tensor, target: int | None, rate: float, num_classes: int, seed: int
    ) -> None:
        self.trigger = trigger
        self.x = x
        self.target = target
        self.rate = float(rate)
        self.num_classes = num_classes
        self.partners = torch.Generator().manual_seed(seed + 1)
        self.rows: torch.Tensor | None = None
        gen, _ = trigger.networks(x.shape[1], x.device)
        gen.train()
        gen.requires_grad_(True)
        self.optimizer = torch.optim.Adam(gen.parameters(), lr=trigger.lr_g, betas=ADAM_BETAS)

    def before_batch(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def partner_rows(self, b: int, nb: int, k: int) -> torch.Tensor:
        """``[k]`` random training-set rows: partner ``j`` gives the pattern and mask of cross row ``nb + j``
        and the diversity pair of backdoor row ``j``, and is neither of those images (when fit told the
        batch's rows)."""
        n = len(self.x)
        out = torch.randint(n, (k,), generator=self.partners)
        if self.rows is None or len(self.rows) != b or n < 3:
            return out
        avoid = [self.rows[: min(k, nb)], self.rows[nb : nb + k]]
        for _ in range(len(avoid) + 1):  # a step past one clash may land on the other: at most two steps
            clash = torch.zeros(k, dtype=torch.bool)
            for rows in avoid:
                clash[: len(rows)] |= out[: len(rows)] == rows
            out[clash] = (out[clash] + 1) % n
        return out

    def compose(self, xb: torch.Tensor, yb: torch.Tensor) -> JointBatch:
        """One training batch as the paper builds it (gradients flow into ``g``)."""
        b = xb.shape[0]
        nb = int(self.rate * b)
        nc = min(int(self.trigger.cross_rate * b), b - nb)
        k = max(nb, nc)  # partner images: the cross rows' sources, and the backdoor rows' diversity pairs
        others = self.x[self.partner_rows(b, nb, k).to(self.x.device)].to(xb.dtype)
        if nb + k == 0:
            return JointBatch(xb, yb, 0, 0, others, xb[:0], xb[:0])
        pattern, m = self.trigger.pattern_and_mask(torch.cat([xb[:nb], others]))
        own, other_pattern = pattern[:nb], pattern[nb:]
        backdoor = xb[:nb] + (own - xb[:nb]) * m[:nb]
        crossed = xb[nb : nb + nc] + (other_pattern[:nc] - xb[nb : nb + nc]) * m[nb : nb + nc]
        inputs = torch.cat([backdoor, crossed, xb[nb + nc :]]).clamp(0.0, 1.0)
        labels = torch.cat([backdoor_labels(yb[:nb], self.target, self.num_classes), yb[nb:]])
        return JointBatch(inputs, labels, nb, nc, others, own, other_pattern)

    def __call__(self, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        batch = self.compose(xb, yb)
        loss = F.cross_entropy(model(batch.inputs), batch.labels)
        nb = batch.n_backdoor
        if nb > 0 and self.trigger.lambda_div > 0:
            div = diversity(xb[:nb], batch.others[:nb], batch.own_pattern, batch.other_pattern[:nb])
            loss = loss + self.trigger.lambda_div * div
        return loss

    def after_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def finish(self) -> None:
        gen, mask = self.trigger.networks(self.x.shape[1])
        gen.eval()
        gen.requires_grad_(False)
        mask.eval()
        gen.cpu()
        mask.cpu()
