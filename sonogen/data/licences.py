"""What the licences of a dataset's images allow: an allow-list for ``prepare``, and whether a model trained on
them may be used commercially (a model learned from NonCommercial images inherits that restriction)."""

from __future__ import annotations

import re
from collections import Counter

YES, NO, UNKNOWN = "yes", "no", "unknown"
# licences that allow commercial use (attribution and share-alike still apply); anything else is not assumed to
_OPEN = re.compile(r"^(CC ?BY( ?SA)?|CC0|CC ?ZERO|PUBLIC ?DOMAIN|PDDL|ODC ?BY|MIT|APACHE|BSD)\b")


def normalise(licence: str) -> str:
    """``CC BY-NC -SA 4.0`` → ``CC BY NC SA 4.0``: case, hyphens and spacing as one form, for matching."""
    return re.sub(r"\s+", " ", re.sub(r"[-_]", " ", licence.upper())).strip()


def commercial_use(licence: str) -> str:
    """``no`` for a NonCommercial licence, ``yes`` for one known to allow commercial use, else ``unknown``."""
    form = normalise(licence)
    if re.search(r"\bNC\b|NON ?COMMERCIAL", form):
        return NO
    return YES if _OPEN.match(form) else UNKNOWN


def commercial_use_of(counts: Counter) -> tuple[str, str]:
    """Whether images under these licences (licence → count) allow commercial use of what is trained on them, and
    why: ``no`` if any image's licence forbids it, ``yes`` only if every one allows it, else ``unknown``."""
    by = {verdict: [f"{licence} ({count})" for licence, count in counts.items() if commercial_use(licence) == verdict]
          for verdict in (NO, UNKNOWN)}
    if by[NO]:
        return NO, f"NonCommercial training images: {', '.join(by[NO])}"
    if by[UNKNOWN]:
        return UNKNOWN, f"licences whose terms are not known here: {', '.join(by[UNKNOWN])}; read them before any use"
    return YES, "every training image's licence allows commercial use (attribution terms still apply)"


def allowed(licence: str, allow_list: list[str]) -> bool:
    return normalise(licence) in {normalise(entry) for entry in allow_list}
