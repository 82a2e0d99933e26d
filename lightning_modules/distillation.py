"""Label-free refinement of a recycled prompt: teach the target to classify like the source.

The source model with the original prompt is the teacher: on unlabelled task inputs it
gives a distribution over the classes (softmax of the verbalizers' log-likelihoods). The
target model with the recycled prompt is the student, and only the student's prompt is
trained, to match the teacher (KL divergence). No labels are used: the inputs are the
task's texts with their labels dropped, and both models stay frozen. Across tokenizers,
each model reads the same text through its own tokenizer.

:class:`MapDistillationModule` trains the same way, but the map instead of a prompt: a fitted
recycler's tensor, on several prompts of one task at once, so that the map then recycles that
task's prompts with no training per prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mlflow_recycle.errors import RecycleError
from mlflow_recycle.prompted_lm import PromptedLM, TaskEncoder
from mlflow_recycle.recyclers import Recycler

from .modules import OptimizerFactory, SchedulerFactory, TrainablePromptModule, adamw


def class_kl(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(teacher ‖ student) between two ``[batch, classes]`` score tables softened by ``temperature``
    (batch mean), and the share of rows on which their argmax agrees."""
    target = torch.log_softmax(teacher / temperature, dim=-1)
    predicted = torch.log_softmax(student / temperature, dim=-1)
    loss = nn.functional.kl_div(predicted, target, log_target=True, reduction="batchmean")
    return loss, (teacher.argmax(-1) == student.argmax(-1)).float().mean()


class PromptDistillationModule(TrainablePromptModule):
    """Train a student prompt on a frozen target model to match a frozen teacher.

    The student is this module's rank classifier (``self.lm``, ``self.prompt``), so a
    validation loop, when the trainer has one, measures the student's accuracy on labelled
    data: labels then only judge the student (the gate), they never train it.

    Args:
        teacher: the source model; ``teacher_prompt`` its trained prompt.
        student: the target model; ``student_init`` where its prompt starts (the recycled one).
        temperature: softens both distributions (1: plain class probabilities).
        optimizer, scheduler: as for prompt tuning (default AdamW, lr 0.01, constant).
        length_normalize: score classes by mean token log-likelihood (as the task says).
        name: metric prefix (``{name}/validation_accuracy``).
    """

    def __init__(
        self,
        teacher: nn.Module,
        teacher_prompt: torch.Tensor,
        student: nn.Module,
        student_init: torch.Tensor,
        *,
        temperature: float = 1.0,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        length_normalize: bool = False,
        name: str = "distill",
    ) -> None:
        super().__init__(
            student,
            student_init,
            optimizer=optimizer,
            scheduler=scheduler,
            length_normalize=length_normalize,
            name=name,
        )
        self.teacher = PromptedLM(teacher.requires_grad_(False).eval())
        self.register_buffer("teacher_prompt", teacher_prompt.detach().clone().float())
        self.temperature = temperature

    def train(self, mode: bool = True) -> PromptDistillationModule:
        super().train(mode)
        self.teacher.model.eval()
        return self

    def distillation_loss(self, batch: dict[str, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """KL(teacher ‖ student) over the classes, and how often their predictions agree."""
        with torch.no_grad():
            teacher = self.teacher.class_scores(self.teacher_prompt, batch["teacher"], self.length_normalize)
        student = self.lm.class_scores(self.prompt, batch["student"], self.length_normalize)
        return class_kl(teacher, student, self.temperature)

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> torch.Tensor:
        loss, agreement = self.distillation_loss(batch)
        self.log_dict({f"{self.name}/loss": loss, f"{self.name}/agreement": agreement}, prog_bar=True)
        return loss

    def student_prompt(self) -> torch.Tensor:
        return self.tuned_prompt()


class MapDistillationModule(L.LightningModule):
    """Train a fitted recycler's map, not a prompt, on what the source model does with prompts.

    For each of ``prompts`` (tuned on the teacher, one task), the student (the target model)
    reading the mapped prompt is trained to classify unlabelled inputs as the teacher does
    reading the prompt itself (:func:`class_kl`); step ``i`` uses prompt ``i mod len(prompts)``.
    Only the recycler's :attr:`~mlflow_recycle.recyclers.Recycler.trainable` tensors train; both
    models stay frozen, and no labels are used. A map trained so carries one task's behaviour
    across the pair: it is trained per pair and task, once, and then recycles every prompt of
    that task at the cost of a transform.

    Args:
        teacher, student: the source and target models.
        recycler: a fitted recycler whose map is a tensor (``linear``); it is not modified
            (:meth:`trained_state` gives the trained tensors).
        prompts: ``[length, d_src]`` prompts of the task on the teacher.
        temperature, optimizer, length_normalize: as :class:`PromptDistillationModule`'s
            (the default optimizer: AdamW, lr 0.003, no weight decay).
        name: metric prefix (``map/loss``, ``map/agreement``).
    """

    def __init__(
        self,
        teacher: nn.Module,
        prompts: Sequence[torch.Tensor],
        student: nn.Module,
        recycler: Recycler,
        *,
        temperature: float = 1.0,
        optimizer: OptimizerFactory | None = None,
        length_normalize: bool = False,
        name: str = "map",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["teacher", "prompts", "student", "recycler", "optimizer"])
        if not prompts:
            raise RecycleError("Training a map on behaviour needs at least one prompt of the task.")
        self.teacher = PromptedLM(teacher.requires_grad_(False).eval())
        self.student = PromptedLM(student.requires_grad_(False).eval())
        self.recycler = recycler
        self.weights = nn.ParameterDict(
            {key: nn.Parameter(value.detach().clone()) for key, value in recycler.trainable_state().items()}
        )
        for i, prompt in enumerate(prompts):  # buffers: they follow the module to its device
            self.register_buffer(f"prompt_{i}", prompt.detach().clone().to(torch.float64))
        self.count = len(prompts)
        self.temperature, self.length_normalize, self.name = temperature, length_normalize, name
        self.optimizer = optimizer or adamw(0.003, weight_decay=0.0)

    def train(self, mode: bool = True) -> MapDistillationModule:
        super().train(mode)
        self.teacher.model.eval()
        self.student.model.eval()
        return self

    def prompt(self, i: int) -> torch.Tensor:
        return getattr(self, f"prompt_{i}")

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> torch.Tensor:
        prompt = self.prompt(self.global_step % self.count)
        with torch.no_grad():
            teacher = self.teacher.class_scores(prompt, batch["teacher"], self.length_normalize)
        mapped = self.recycler.mapped(prompt, dict(self.weights))  # float64; the LM casts it to its dtype
        student = self.student.class_scores(mapped, batch["student"], self.length_normalize)
        loss, agreement = class_kl(teacher, student, self.temperature)
        self.log_dict({f"{self.name}/loss": loss, f"{self.name}/agreement": agreement}, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer(self.weights.parameters())

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors, on the CPU (for :meth:`Recycler.load_trained`)."""
        return {key: value.detach().cpu() for key, value in self.weights.items()}


class _Texts(Dataset):
    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> str:
        return self.texts[i]


class UnlabelledPairDataModule(L.LightningDataModule):
    """Unlabelled texts, each tokenised for the teacher and for the student (tokenizers may differ)."""

    def __init__(
        self, texts: list[str], teacher: TaskEncoder, student: TaskEncoder, *, batch_size: int = 32, seed: int = 0
    ) -> None:
        super().__init__()
        self.texts, self.teacher, self.student = texts, teacher, student
        self.batch_size, self.seed = batch_size, seed

    def _collate(self, texts: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        return {
            "teacher": self.teacher.scoring_batch(self.teacher.contexts(texts)),
            "student": self.student.scoring_batch(self.student.contexts(texts)),
        }

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            _Texts(self.texts),
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            generator=generator,
            collate_fn=self._collate,
        )
