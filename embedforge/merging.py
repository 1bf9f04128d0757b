"""Weight merging of a fine-tuned model with its base model (LM-Cocktail's remedy for a model
that forgets the domains it served): alpha x fine-tuned + (1 - alpha) x base, parameter by
parameter. Train saves a merge when asked (--merge-alpha); evaluate offers one when a
--regression-set says the fine-tuned model forgets."""

from __future__ import annotations

from pathlib import Path

from embedforge.errors import EmbedforgeError
from embedforge.files import replace_folder


def merged_state(base: dict, tuned: dict, alpha: float) -> dict:
    """torch.lerp returns either end exactly at alpha 0 and 1; integer buffers (position ids)
    are the same in both models and kept."""
    import torch

    return {name: torch.lerp(base[name].to(value.device, value.dtype), value, alpha) if value.is_floating_point() else value for name, value in tuned.items()}


def check_mergeable(base: dict, tuned: dict, where: str) -> None:
    if base.keys() != tuned.keys() or any(base[name].shape != value.shape for name, value in tuned.items()):
        raise EmbedforgeError("The fine-tuned and the base model do not have the same parameters, so they cannot be merged",
                              where=where, fix="drop --merge-alpha (or set it to 1)")


def save_merged(base, tuned, alpha: float, folder: Path) -> Path:
    """The merge of two loaded SentenceTransformers, written whole into `folder` (or not at all);
    `tuned` itself is left as it was."""
    tuned_state = {name: value.detach().clone() for name, value in tuned.state_dict().items()}
    base_state = base.state_dict()
    check_mergeable(base_state, tuned_state, str(folder))
    tuned.load_state_dict(merged_state(base_state, tuned_state, alpha))
    try:
        with replace_folder(Path(folder)) as temporary:
            tuned.save(str(temporary))
    finally:
        tuned.load_state_dict(tuned_state)
    return Path(folder)
