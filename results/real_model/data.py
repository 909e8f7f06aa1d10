"""Data for results/real_model.sh: the capability (two-digit addition, answer with only the number) and
the retention probe (capital cities, an unrelated skill the stock model partly has), written as JSONL.

    python results/real_model/data.py OUT_DIR

The addition pairs are split in halves as in tests/test_real_model.py and docs/real_model.md: training
prompts come from half 0, held-out prompts from half 1, so no evaluated question is ever trained on; the teacher's SFT is stopped on a validation
slice of half 1 that is not among the 200 held-out questions.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

QUESTION = "What is {a} plus {b}? Reply with only the number."
CAPITAL_QUESTION = "What is the capital of {country}? Reply with only the city name."
# well-known countries; the verifier (verify.py) accepts a reply that names the capital as a word
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "the United Kingdom": "London", "Ireland": "Dublin", "Belgium": "Brussels", "the Netherlands": "Amsterdam",
    "Austria": "Vienna", "Switzerland": "Bern", "Poland": "Warsaw", "Czechia": "Prague", "Hungary": "Budapest",
    "Greece": "Athens", "Sweden": "Stockholm", "Norway": "Oslo", "Denmark": "Copenhagen", "Finland": "Helsinki",
    "Iceland": "Reykjavik", "Russia": "Moscow", "Ukraine": "Kyiv", "Romania": "Bucharest", "Bulgaria": "Sofia",
    "Serbia": "Belgrade", "Croatia": "Zagreb", "Turkey": "Ankara", "Egypt": "Cairo", "Morocco": "Rabat",
    "Kenya": "Nairobi", "Nigeria": "Abuja", "Ethiopia": "Addis Ababa", "Ghana": "Accra", "South Africa": "Pretoria",
    "Algeria": "Algiers", "Tunisia": "Tunis", "Senegal": "Dakar", "Japan": "Tokyo", "China": "Beijing",
    "South Korea": "Seoul", "North Korea": "Pyongyang", "India": "New Delhi", "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta",
    "the Philippines": "Manila", "Malaysia": "Kuala Lumpur", "Singapore": "Singapore", "Nepal": "Kathmandu",
    "Iran": "Tehran", "Iraq": "Baghdad", "Saudi Arabia": "Riyadh", "Israel": "Jerusalem", "Jordan": "Amman",
    "Lebanon": "Beirut", "Syria": "Damascus", "Afghanistan": "Kabul", "Qatar": "Doha", "Australia": "Canberra",
    "New Zealand": "Wellington", "Canada": "Ottawa", "the United States": "Washington", "Mexico": "Mexico City",
    "Cuba": "Havana", "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Chile": "Santiago", "Peru": "Lima",
    "Colombia": "Bogota", "Venezuela": "Caracas", "Ecuador": "Quito", "Uruguay": "Montevideo",
    "Paraguay": "Asuncion", "Bolivia": "Sucre", "Jamaica": "Kingston", "Mongolia": "Ulaanbaatar",
    "Kazakhstan": "Astana", "Uzbekistan": "Tashkent", "Sri Lanka": "Colombo", "Myanmar": "Naypyidaw",
    "Cambodia": "Phnom Penh", "Laos": "Vientiane", "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius",
    "Slovakia": "Bratislava", "Slovenia": "Ljubljana", "Albania": "Tirana", "Belarus": "Minsk",
    "Georgia": "Tbilisi", "Armenia": "Yerevan", "Azerbaijan": "Baku", "Libya": "Tripoli", "Sudan": "Khartoum",
    "Uganda": "Kampala", "Tanzania": "Dodoma", "Zimbabwe": "Harare", "Angola": "Luanda", "Cyprus": "Nicosia",
    "Luxembourg": "Luxembourg", "Malta": "Valletta", "Panama": "Panama City", "Costa Rica": "San Jose",
}


def addition_rows(half: int, n: int | None = None) -> list[dict]:
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(0).shuffle(pairs)
    chosen = pairs[half::2][:n]
    return [{"prompt": QUESTION.format(a=a, b=b), "answer": str(a + b)} for a, b in chosen]


def capital_rows() -> list[dict]:
    return [{"prompt": CAPITAL_QUESTION.format(country=c), "answer": city} for c, city in CAPITALS.items()]


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    write(out / "train.jsonl", addition_rows(0))           # 4,050 training questions
    write(out / "eval.jsonl", addition_rows(1, 200))       # 200 held-out questions
    write(out / "valid.jsonl", addition_rows(1)[200:300])  # 100 more, where the teacher's SFT is stopped
    write(out / "retention.jsonl", capital_rows())          # 105 capital-city questions
    print(out)
