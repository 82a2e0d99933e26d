"""How a soft prompt meets a frozen Hugging Face model: tokenising a task, the prompted
forward pass, the tuning loss and rank-classification scores.

Pure torch and transformers, shared by the Lightning modules (training, evaluation) and
the MLflow pyfunc (prediction), so all three compute exactly the same thing.

Layout of a causal-LM row (left-padded so every row ends at the same position)::

    [soft prompt][pad ... pad][bos][template prefix][text][template suffix][verbalizer[:-1]]

Position ids count only real tokens, so padding never shifts positions. The last ``K``
logits of each row predict the verbalizer tokens (``K`` = longest verbalizer), so the
model only computes ``K`` vocabulary projections per row (``logits_to_keep``). For
encoder-decoder models the prompt goes in front of the (right-padded) encoder input and
the verbalizer is the decoder target. Every pass is counted in the open compute meters
(:func:`mlflow_recycle.compute.metered`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .compute import pass_compute, record
from .errors import RecycleError
from .task import TaskSpec

IGNORE = -100


class TaskEncoder:
    """Token ids for a task: each example's context, each class's verbalizer, and batches.

    Args:
        tokenizer: the base model's Hugging Face tokenizer.
        task: template, verbalizers, ``max_length`` and ``truncation_side``.
        add_bos: start each context with the tokenizer's BOS token (when it has one), as
            the model saw documents start in pre-training.
        seq2seq: encode for an encoder-decoder model (verbalizer as the decoder target).
    """

    def __init__(
        self,
        tokenizer: Any,
        task: TaskSpec,
        *,
        add_bos: bool = True,
        seq2seq: bool = False,
    ) -> None:
        self.tokenizer, self.task, self.seq2seq = tokenizer, task, seq2seq
        max_length = task.max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        bos = tokenizer.bos_token_id if add_bos and not seq2seq else None
        # Whitespace that ends the prefix belongs to the text's first word for BPE tokenizers.
        prefix = task.prefix
        self._lead = prefix[len(prefix.rstrip()) :]
        self.prefix_ids = ([bos] if bos is not None else []) + self._ids(prefix.rstrip())
        self.suffix_ids = self._ids(task.suffix)
        if seq2seq and tokenizer.eos_token_id is not None:
            self.suffix_ids.append(tokenizer.eos_token_id)
        self.verbalizer_ids = [self._ids(v) for v in task.verbalizers]
        for verbalizer, ids in zip(task.verbalizers, self.verbalizer_ids, strict=True):
            if not ids:
                raise RecycleError(
                    f"Task {task.name!r}: verbalizer {verbalizer!r} tokenizes to nothing with this tokenizer; "
                    "choose a label word the tokenizer knows, e.g. ' positive'."
                )
        if len({tuple(ids) for ids in self.verbalizer_ids}) != len(self.verbalizer_ids):
            raise RecycleError(
                f"Task {task.name!r}: two verbalizers tokenize to the same ids {self.verbalizer_ids}; "
                "the classes could not be told apart. Choose distinct label words."
            )
        self.text_budget = max_length - len(self.prefix_ids) - len(self.suffix_ids) - max(map(len, self.verbalizer_ids))
        if self.text_budget < 8:
            raise RecycleError(
                f"max_length={max_length} leaves {self.text_budget} tokens for the text after the template "
                f"({len(self.prefix_ids) + len(self.suffix_ids)} tokens) and the verbalizer; raise max_length."
            )
        # Classes whose verbalizers share all but the last token share one model row.
        self.class_inputs = sorted({tuple(ids[:-1]) for ids in self.verbalizer_ids})
        self.class_row = [self.class_inputs.index(tuple(ids[:-1])) for ids in self.verbalizer_ids]
        self.max_target = max(map(len, self.verbalizer_ids))

    @property
    def num_classes(self) -> int:
        return len(self.verbalizer_ids)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def contexts(self, texts: Sequence[str]) -> list[list[int]]:
        """Template + truncated text, as ids, for each text."""
        if not texts:
            return []
        encoded = self.tokenizer([self._lead + t for t in texts], add_special_tokens=False)["input_ids"]
        keep = self.text_budget
        cut = (lambda ids: ids[:keep]) if self.task.truncation_side == "right" else (lambda ids: ids[-keep:])
        return [self.prefix_ids + cut(list(ids)) + self.suffix_ids for ids in encoded]

    # ------------------------------------------------------------------ batches
    def _pad(self, rows: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return ids, mask

    def _targets(self, rows: list[list[int]], right_aligned: bool) -> torch.Tensor:
        out = torch.full((len(rows), self.max_target), IGNORE, dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(self.max_target - len(row), None) if right_aligned else slice(0, len(row))
            out[i, span] = torch.tensor(row, dtype=torch.long)
        return out

    def training_batch(self, contexts: list[list[int]], labels: Sequence[int]) -> dict[str, torch.Tensor]:
        """Rows that teach the model to continue each context with its label's verbalizer."""
        targets = [self.verbalizer_ids[label] for label in labels]
        if self.seq2seq:
            input_ids, mask = self._pad(contexts, left=False)
            return {"input_ids": input_ids, "attention_mask": mask, "targets": self._targets(targets, False)}
        input_ids, mask = self._pad([c + t[:-1] for c, t in zip(contexts, targets, strict=True)], left=True)
        return {"input_ids": input_ids, "attention_mask": mask, "targets": self._targets(targets, True)}

    def scoring_batch(self, contexts: list[list[int]]) -> dict[str, torch.Tensor]:
        """Rows to score every class of every context in one forward pass.

        ``row_of_class[b, c]`` is the row whose last logits score class ``c`` of example
        ``b``; ``class_targets[c]`` are that class's verbalizer ids (``-100`` padded).
        """
        n_rows = len(self.class_inputs) if not self.seq2seq else self.num_classes
        if self.seq2seq:
            rows = [c for c in contexts for _ in range(self.num_classes)]
            input_ids, mask = self._pad(rows, left=False)
            class_targets = self._targets(self.verbalizer_ids, right_aligned=False)
            row_of_class = torch.arange(len(contexts) * n_rows).view(len(contexts), n_rows)
            decoder_targets = class_targets.repeat(len(contexts), 1)
            return {
                "input_ids": input_ids,
                "attention_mask": mask,
                "row_of_class": row_of_class,
                "class_targets": class_targets,
                "decoder_targets": decoder_targets,
            }
        rows = [c + list(suffix) for c in contexts for suffix in self.class_inputs]
        input_ids, mask = self._pad(rows, left=True)
        offsets = torch.arange(len(contexts)).unsqueeze(1) * n_rows
        row_of_class = offsets + torch.tensor(self.class_row).unsqueeze(0)
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "row_of_class": row_of_class,
            "class_targets": self._targets(self.verbalizer_ids, right_aligned=True),
        }


class PromptedLM(nn.Module):
    """A frozen Hugging Face LM that reads a soft prompt in front of its input.

    The wrapped model is never modified; the prompt is passed to each call, so one
    ``PromptedLM`` serves the trained prompt, recycled prompts and the no-prompt baseline.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        # For the compute meters: the vocabulary head runs at the kept positions only, the input
        # embedding is a lookup, every other parameter runs at every position.
        vocab, dim = model.get_input_embeddings().weight.shape
        head = model.get_output_embeddings()
        untied = head is not None and head.weight is not model.get_input_embeddings().weight
        total = sum(p.numel() for p in model.parameters())
        self.head_parameters = int(vocab * dim)
        self.body_parameters = int(total - vocab * dim - (head.weight.numel() if untied else 0))

    @property
    def dim(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    def log_probs(
        self,
        prompt: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        keep: int,
        decoder_targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Log-softmax over the vocabulary at the ``keep`` positions that predict targets: ``[N, keep, V]``.

        A stack of ``K`` prompts (``[K, length, dim]``) reads the batch once per prompt in one pass:
        ``[K * N, keep, V]``, prompt ``k``'s rows at ``k * N ... (k + 1) * N - 1``."""
        embeds = self.model.get_input_embeddings()(input_ids)
        if prompt is not None:
            if prompt.shape[-1] != embeds.shape[-1]:
                raise RecycleError(
                    f"Prompt dim {prompt.shape[-1]} does not match the model's embedding dim {embeds.shape[-1]}: "
                    "recycle the prompt to this model first."
                )
            stack = prompt.to(embeds.dtype).reshape(-1, *prompt.shape[-2:])  # [K, length, dim]
            n = embeds.shape[0]
            rows = stack.repeat_interleave(n, dim=0)
            embeds, attention_mask = embeds.repeat(len(stack), 1, 1), attention_mask.repeat(len(stack), 1)
            if decoder_targets is not None:
                decoder_targets = decoder_targets.repeat(len(stack), 1)
            embeds = torch.cat([rows, embeds], dim=1)
            attention_mask = torch.cat([attention_mask.new_ones(embeds.shape[0], stack.shape[1]), attention_mask], 1)
        # use_cache=False: a scoring or training pass never decodes further, and the KV cache it would
        # build cost 12% of an evaluation's time and a third of its memory (small-a, 64 rows)
        if self.seq2seq:
            out = self.model(
                inputs_embeds=embeds, attention_mask=attention_mask, labels=decoder_targets, use_cache=False
            )
            logits = out.logits
            kept = logits.shape[0] * logits.shape[1]
        else:
            position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
            extra = {"logits_to_keep": keep} if self._keeps_logits else {}
            out = self.model(
                inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **extra
            )
            logits = out.logits[:, -keep:]
            kept = embeds.shape[0] * keep
        trains = prompt is not None and prompt.requires_grad and torch.is_grad_enabled()
        record(
            pass_compute(embeds.shape[0] * embeds.shape[1], kept, self.body_parameters, self.head_parameters, trains)
        )
        return torch.log_softmax(logits.float(), dim=-1)

    @staticmethod
    def _gather(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token log-likelihood of ``targets`` (``-100`` positions give 0)."""
        picked = log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return picked * (targets != IGNORE)

    @staticmethod
    def _per_prompt(values: torch.Tensor, prompt: torch.Tensor | None) -> torch.Tensor:
        """``values`` of a pass (``[K * N, ...]`` for a stack of K prompts) as ``[K, N, ...]``, or as is
        for one prompt (or none)."""
        return values if prompt is None or prompt.dim() == 2 else values.view(prompt.shape[0], -1, *values.shape[1:])

    def loss(self, prompt: torch.Tensor | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean negative log-likelihood of the verbalizer tokens (the LM loss on the label); ``[K]``, one
        per prompt, for a stack of prompts."""
        targets = batch["targets"]
        log_probs = self.log_probs(
            prompt,
            batch["input_ids"],
            batch["attention_mask"],
            keep=targets.shape[1],
            decoder_targets=targets if self.seq2seq else None,
        )
        picked = self._per_prompt(self._gather(log_probs, targets.repeat(len(log_probs) // len(targets), 1)), prompt)
        return -picked.sum((-2, -1)) / (targets != IGNORE).sum()

    def class_loss(
        self, prompt: torch.Tensor | None, batch: dict[str, torch.Tensor], length_normalize: bool = False
    ) -> torch.Tensor:
        """Cross-entropy of each example's label among the classes (a scoring batch with ``labels``).

        The objective of the rank classification the prompt is judged by: it moves only what
        separates the classes, where the LM loss also spends its gradient on raising the
        verbalizers over the rest of the vocabulary."""
        scores = self.class_scores(prompt, batch, length_normalize)
        if scores.dim() == 2:
            return nn.functional.cross_entropy(scores, batch["labels"])
        per_example = nn.functional.cross_entropy(
            scores.transpose(1, 2), batch["labels"].expand(len(scores), -1), reduction="none"
        )
        return per_example.mean(-1)  # [K]: one loss per prompt of the stack

    def class_scores(
        self, prompt: torch.Tensor | None, batch: dict[str, torch.Tensor], length_normalize: bool = False
    ) -> torch.Tensor:
        """Log-likelihood of each class's verbalizer as the continuation: ``[B, C]``; ``[K, B, C]`` for a
        stack of K prompts, scored in one pass."""
        class_targets, row_of_class = batch["class_targets"], batch["row_of_class"]
        log_probs = self.log_probs(
            prompt,
            batch["input_ids"],
            batch["attention_mask"],
            keep=class_targets.shape[1],
            decoder_targets=batch.get("decoder_targets"),
        )
        per_class = self._per_prompt(log_probs, prompt)[..., row_of_class, :, :]  # [(K,) B, C, keep, V]
        targets = class_targets.expand(*per_class.shape[:-1])  # [(K,) B, C, keep]
        scores = self._gather(per_class, targets).sum(-1)
        if length_normalize:
            scores = scores / (class_targets != IGNORE).sum(-1)
        return scores
