"""What the training loop asks of a stage it trains.

A ``TrainableStage`` says, in one place, everything that differs between the stages the pipeline
trains: the phase that feeds it and the columns it reads, its model, its loss and sample grid (a
``Task`` on each worker), the weights it exports, the stages its sample grid renders through, and
how the loop shards and compiles its model (``Parallelism``, torchtitan's ``parallelize`` as data).
The loop in ``pipelines/train.py`` and the phase in ``pipelines/train_phase.py`` ask the stage and
never name one.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipelines import schema, trained_weights
from pipelines.reports import fit_square, to_uint8
from pipelines.storage import StorageConfig

if TYPE_CHECKING:  # the scorer's imports (open_clip, pytorch-fid) load only where a chain is scored
    from pipelines.chain_evaluation import ChainEvaluation


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageALosses:
    """Stage A's optional loss terms beside reconstruction and quantisation (``train_a`` only):
    VQGAN's perceptual and adversarial terms (stages/stage_a_losses.py). The logged loss is the sum
    of every term, the critic's own hinge loss included."""

    perceptual_weight: float = 0.0
    """Weight of the perceptual distance; 0: not computed (VQGAN uses 1.0)."""
    perceptual_weights: str = ""
    """Path or URL of torchvision's VGG16 checkpoint for the v2 network; empty: random features
    (the tiny network is always random)."""
    adversarial_weight: float = 0.0
    """Weight of the patch critic's term for the autoencoder; 0: no critic is built (VQGAN: 0.8)."""
    adversarial_start_step: int = 0
    """First step at which the critic and its term count (VQGAN waits for decent reconstructions)."""

    def __post_init__(self):
        for name in ("perceptual_weight", "adversarial_weight", "adversarial_start_step"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def active(self) -> bool:
        return self.perceptual_weight > 0 or self.adversarial_weight > 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """Everything a worker needs to build a task; small and picklable."""

    stage: str
    """The stage's name in the registry (pipelines/trainable)."""
    models: str
    """Size in the stage registries (tiny, v2)."""
    caption_dropout: float
    semantic_dropout: float
    semantic_noise: float
    text_from_tokens: bool
    """The latent shards hold tokens only: encode the text on the worker."""
    empty_caption: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    """Hidden states of the empty caption per text column (classifier-free guidance)."""
    sample_prompts: tuple[str, ...] = ()
    """Fixed prompts of the sample grids (Stage C)."""
    sample_batch: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    """Fixed held-in samples for the grids of Stage B, Stage A and the semantic compressor."""
    validation_batches: tuple[dict[str, np.ndarray], ...] = ()
    """Held-out rows of the validation split (the training columns: latents, or the image stages'
    decoded crops), one group per latent shape, on which the loop evaluates the loss
    (pipelines/training/evaluation.py); empty: no evaluation."""
    chain_evaluation: ChainEvaluation | None = None
    """Held-out captions and settings for scoring the chain at each evaluation (a stage with
    ``evaluates_chain``); None: not scored."""
    partner_weights: dict[str, str] = dataclasses.field(default_factory=dict)
    """Weights of already trained stages, used to render samples (stage name -> path or URL, read on
    the worker: a copy the driver made would be on the driver's node only)."""
    resolution: int = 64
    """Side of the decoded crops, pixels."""
    stage_a_losses: StageALosses = dataclasses.field(default_factory=StageALosses)
    loss_weights: str = ""
    """Path or URL of the weights of a network the loss uses (Stage A's perceptual VGG16), read on the worker."""
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)
    """Where the weights URLs above and ``TrainConfig.init_weights`` are read from."""
    activation_checkpointing: bool = False
    """Stage B and Stage C recompute each block's activations in backward."""


class Task:
    """Loss and sample grid of one stage, on one worker."""

    def __init__(self, spec: TaskSpec, device: torch.device):
        self.spec, self.device = spec, device
        self._partners: dict[str, nn.Module] = {}

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator, step: int
    ) -> torch.Tensor:
        """The training loss of one batch at optimizer step ``step`` (counted from 0)."""
        raise NotImplementedError

    def sample_grid(self, model: nn.Module, step: int) -> Image.Image | None:
        """What the model (in eval mode) makes of fixed inputs at this step; None where it cannot show one."""
        raise NotImplementedError

    def validation_losses(
        self, model: nn.Module, batch: dict[str, torch.Tensor], first_row: int
    ) -> dict[str, torch.Tensor]:
        """The held-out loss of a batch of validation rows (``first_row`` on, in the fixed order every
        evaluation reads them): each sample's terms (B,) by name, ``loss`` the one read beside the
        training loss, of ``model`` as it is (eval mode, no gradients). Anything it draws follows from
        the rows' indices, so the same weights give the same terms (pipelines/training/evaluation.py)."""
        raise NotImplementedError

    @torch.no_grad()
    def samples(self, model: nn.Module, step: int) -> Image.Image | None:
        """A grid a person can look at: what the model makes of fixed inputs at this step."""
        model.eval()
        try:
            return self.sample_grid(model, step)
        finally:
            model.train()

    def partner(self, name: str) -> nn.Module | None:
        """An already trained stage the sample grid renders through; None if its weights are not there."""
        # Imported here: the registry imports every stage module, this one's included.
        from pipelines.trainable import REGISTRY

        url = self.spec.partner_weights.get(name)
        if url is None:
            return None
        if name not in self._partners:  # loaded once: every sample grid and evaluation renders through it
            model = REGISTRY[name].build_model(dataclasses.replace(self.spec, stage=name))
            self._partners[name] = trained_weights.load(model, url, self.spec.storage).to(self.device).eval()
        return self._partners[name]


def whole_model(model: nn.Module) -> nn.Module:
    return model


def no_weights(config: Any) -> str:
    return ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Parallelism:
    """How the training loop shards and compiles a stage's model (its model code stays single-device)."""

    sharded_blocks: tuple[type[nn.Module], ...] = ()
    """FSDP's units: each is gathered only while it runs forward or backward; the rest of the model
    goes with the root unit."""
    compiled_blocks: tuple[type[nn.Module], ...] = ()
    """Compiled one by one (blocks of one shape share their compiled code); none: the model is
    compiled whole."""
    levels: Callable[[nn.Module], list[list[nn.Module]]] | None = None
    """The model's levels, outermost first, that may each have an activation memory budget of their
    own; None: one budget for every block."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainableStage:
    """One stage the pipeline trains: everything the training phase and loop need to know of it."""

    name: str
    """Its name in ``TaskSpec.stage``, in the registry and in other stages' ``sample_partners``."""
    phase: str
    """Its training phase in the pipeline."""
    config_section: str
    """The RunConfig field that holds its TrainConfig."""
    source_phase: str
    """The phase whose output it learns from: decode (crops) or pre_encode (latent shards)."""
    columns: Callable[[TaskSpec], list[str]]
    """Columns of the training data set that it reads."""
    build_model: Callable[[TaskSpec], nn.Module]
    """The freshly initialised model it trains."""
    task: Callable[[TaskSpec, torch.device], Task]
    """Its loss and sample grid, built on each worker."""
    export: Callable[[nn.Module], nn.Module] = whole_model
    """The part of the trained model that later phases load."""
    exports_its_loss: bool = True
    """Its held-out loss is a function of the exported weights alone, so ``pipelines/evaluate.py``
    recomputes it from them; False where the loss needs what ``export`` leaves behind."""
    parallelism: Parallelism = Parallelism()
    text_column: str = ""
    """The caption hidden states it is conditioned on: the driver hands it the empty caption's for
    caption dropout. Empty: no text conditioning."""
    latent_column: str = ""
    """The latent it learns from, whose size sets its step's memory (cluster/memory.py); empty: images."""
    sample_partners: tuple[str, ...] = ()
    """Trained stages its sample grid renders through, when their weights exist."""
    evaluates_chain: bool = False
    """Its evaluations also render held-out captions through its sample partners and score them
    (pipelines/chain_evaluation.py): its task has ``chain_metrics``."""
    encoder_weights: str = ""
    """The ``pre_encode`` setting that names weights to use instead of its own training; empty: it
    always trains."""
    loss_weights: Callable[[Any], str] = no_weights
    """The path or URL of pretrained weights its loss loads, from its TrainConfig; empty: none."""
    check_crop: Callable[[Any, tuple[int, int]], None] | None = None
    """Raises ValueError, before training starts, for a crop (width, height) of the RunConfig whose
    latents the model cannot take."""


def decode_images(batch: dict[str, Any], resolution: int) -> dict[str, Any]:
    """Ray Data step for the image-trained stages: encoded crops -> uint8 arrays (B, R, R, 3). The
    encoders learn from squares: a crop of an aspect-ratio bucket gives its centre square."""
    squares = [
        np.asarray(fit_square(Image.open(io.BytesIO(data)).convert("RGB"), resolution)) for data in batch[schema.IMAGE]
    ]
    # A batch may come empty: training leaves the held-out rows out before decoding.
    batch[schema.IMAGE] = np.stack(squares) if squares else np.empty((0, resolution, resolution, 3), np.uint8)
    return batch


def pil_images(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(image) for image in to_uint8(images)]


def sample_images(spec: TaskSpec, device: torch.device) -> torch.Tensor:
    """The sample batch's images, (B, 3, R, R) in [0, 1]."""
    return torch.tensor(spec.sample_batch[schema.IMAGE]).permute(0, 3, 1, 2).float().to(device) / 255


def batch_images(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A training batch's images, (B, 3, R, R) in [0, 1]."""
    return batch[schema.IMAGE].permute(0, 3, 1, 2).float() / 255
