"""Concept words -> token positions in the attribution prompt P'.

A concept is a word or phrase of P'. CLIP's BPE splits text into words before merging,
so a concept tokenised alone yields exactly the sub-tokens it has inside P'; we look for
that sub-token sequence in P' and average the attention columns of its positions
(DESIGN.md section 2: "a concept spanning several BPE tokens is the mean over its
sub-tokens"). A concept P' does not contain is an error naming P''s tokens: silently
attributing to the wrong column would produce a plausible-looking but meaningless map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


class ConceptNotFoundError(ValueError):
    """A concept's tokens do not occur in the attribution prompt."""


@dataclass(frozen=True)
class ConceptTokens:
    """Where each concept sits in the tokenised attribution prompt.

    prompt_tokens: P''s tokens as strings, start-of-text to end-of-text, no padding.
    positions: per concept, the key positions of its sub-tokens (first occurrence).
    num_keys: the text encoder's sequence length (77 for CLIP), padding included.
    """

    concepts: tuple[str, ...]
    prompt_tokens: tuple[str, ...]
    positions: tuple[tuple[int, ...], ...]
    num_keys: int

    @property
    def num_real_tokens(self) -> int:
        """Tokens from start-of-text through end-of-text: the "prompt" softmax domain."""
        return len(self.prompt_tokens)

    def token_index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """long [T]: every concept's sub-token positions, concatenated in concept order."""
        flat = [p for positions in self.positions for p in positions]
        return torch.tensor(flat, dtype=torch.long, device=device)

    def mean_matrix(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """[C, T] averaging matrix: row c holds 1/len(c) on concept c's sub-token columns."""
        total = sum(len(p) for p in self.positions)
        matrix = torch.zeros(len(self.positions), total, dtype=dtype)
        start = 0
        for row, positions in enumerate(self.positions):
            matrix[row, start : start + len(positions)] = 1.0 / len(positions)
            start += len(positions)
        return matrix.to(device)

    def key_mask(self, softmax_over: str, device=None) -> torch.Tensor | None:
        """bool [1, num_keys], True from start- to end-of-text ("prompt"); None for "padded"."""
        if softmax_over == "padded":
            return None
        mask = torch.arange(self.num_keys) < self.num_real_tokens
        return mask[None].to(device)


def _find_subsequence(haystack: Sequence[int], needle: Sequence[int]) -> int:
    for start in range(len(haystack) - len(needle) + 1):
        if list(haystack[start : start + len(needle)]) == list(needle):
            return start
    return -1


def concept_positions(
    tokenizer, prompt: str, concepts: Sequence[str], *, max_length: int | None = None
) -> ConceptTokens:
    """Token positions of each concept inside `prompt`, as the text encoder sees it.

    tokenizer: the tokenizer of the text stream the keys come from (the pipeline's first
    CLIP tokenizer for UNets; an MM-DiT's CLIP or T5 tokenizer). concepts: words or
    phrases; each must occur in the (truncated) tokenised prompt. If a concept occurs
    several times, its first occurrence is used. max_length: the stream's sequence length
    (default tokenizer.model_max_length; MM-DiT pipelines pad T5 to their own
    max_sequence_length). Raises ConceptNotFoundError naming the prompt's tokens.
    """
    if isinstance(concepts, str):
        raise TypeError(
            f"concepts must be a list of words or phrases, got the string {concepts!r}; "
            f"write [{concepts!r}]"
        )
    concepts = tuple(concepts)
    if not concepts:
        raise ValueError(
            "concepts is empty; give at least one word or phrase of the attribution prompt"
        )
    num_keys = int(max_length or tokenizer.model_max_length)
    prompt_ids = tokenizer(prompt, truncation=True, max_length=num_keys).input_ids
    prompt_tokens = tuple(tokenizer.convert_ids_to_tokens(prompt_ids))
    readable = [t.replace("</w>", "") for t in prompt_tokens]
    positions = []
    for concept in concepts:
        if not isinstance(concept, str) or not concept.strip():
            raise ValueError(f"each concept must be a non-empty string, got {concept!r}")
        concept_ids = tokenizer(concept, add_special_tokens=False).input_ids
        start = _find_subsequence(prompt_ids, concept_ids) if concept_ids else -1
        if start < 0:
            concept_tokens = [
                t.replace("</w>", "") for t in tokenizer.convert_ids_to_tokens(concept_ids)
            ]
            full_ids = tokenizer(prompt, truncation=False, verbose=False).input_ids
            if len(full_ids) > num_keys and _find_subsequence(full_ids, concept_ids) >= 0:
                raise ConceptNotFoundError(
                    f"Concept {concept!r} is cut off: the attribution prompt has "
                    f"{len(full_ids)} tokens and was truncated to the text encoder's "
                    f"{num_keys}, which end at {readable[-4:]}. Shorten the attribution prompt."
                )
            raise ConceptNotFoundError(
                f"Concept {concept!r} (tokens {concept_tokens}) is not in the attribution prompt "
                f"{prompt!r}. Its tokens are {readable}. Use a word or phrase of the attribution "
                "prompt, or add the concept to it (e.g. '... and gender')."
            )
        positions.append(tuple(range(start, start + len(concept_ids))))
    return ConceptTokens(concepts, prompt_tokens, tuple(positions), num_keys)
