"""Verifier of the retention probe: the reply names the expected city as a whole word (case and accents
of plain ASCII aside), e.g. "Paris", "The capital of France is Paris." Used as
`--verifier python:results.real_model.verify:names_city` from the repository root."""

import re
import unicodedata


def _plain(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()


def names_city(completion: str, answer: str) -> bool:
    return re.search(rf"\b{re.escape(_plain(answer))}\b", _plain(completion)) is not None
