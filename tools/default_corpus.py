"""The generated training corpus of the default model (models/nld-tiny).

[checkpoint: made by tools/train_default_model.py] ──builder──▶ engine dir ──runtime──▶ Triton

Deterministic templated English built from the word lists below: stories, counting,
times tables, weekly plans and repeated lists. Every document opens with a short
"prompt" part that holds all of its random choices (names, animals, numbers, ...) and
continues with text that is a fixed function of that opening, so a model that has
learned the templates can predict long runs ahead: exactly what block diffusion and
self-speculation need to accept many tokens per forward.

`held_out_prompts()` gives openings whose slot combinations never occur in training;
`training_documents()` skips every document that shares a held-out combination.
"""

from __future__ import annotations

import random

NAMES = ("Tom Ann Mia Sam Ben Lily Max Zoe Leo Emma Jack Nora Finn Ruby Owen Ivy Hugo Lucy Adam Ella "
         "Noah Rosa Paul Kate Luke Jane Omar Nina Carl Alice").split()
ANIMALS = "cat dog fox bear duck frog owl rabbit mouse horse goat pig lion tiger wolf deer bird sheep cow hen".split()
ADJECTIVES = "small big happy brave quiet clever kind shy old young lazy busy gentle funny little proud".split()
COLORS = "red blue green yellow white black brown pink orange purple gray".split()
PLACES = "forest village garden farm house town valley castle school cottage".split()
LANDMARKS = "river lake bridge mountain road sea park well mill pond".split()
OBJECTS = "ball hat book cup kite box bag boat drum key lamp map ring shoe spoon".split()
FOODS = "apple bread cake cheese carrot soup honey milk egg pie plum rice bean pear corn".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
DAY_PLANS = ("reads a book", "goes to the market", "cleans the house", "visits a friend",
             "bakes some bread", "walks in the park", "rests at home")
ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " \
       "sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_word(n: int) -> str:
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_word(rest))
    raise ValueError(n)


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


# -- genres: each returns (key, opening, continuation); key names the slot combination ---------------

def story(rng: random.Random) -> tuple[tuple, str, str]:
    n, adj, animal = rng.choice(NAMES), rng.choice(ADJECTIVES), rng.choice(ANIMALS)
    place, mark, color, obj = rng.choice(PLACES), rng.choice(LANDMARKS), rng.choice(COLORS), rng.choice(OBJECTS)
    thing = f"{color} {obj}"
    if rng.random() < 0.5:
        opening = (f"Once upon a time there was {_a(adj)} {animal} named {n}. {n} lived in {_a(place)} "
                   f"near the {mark}. {n} had {_a(thing)}.")
        rest = (f" Every morning {n} took the {thing} to the {mark}. One day {n} lost the {thing} near the "
                f"{mark}. {n} was very sad. {n} looked for the {thing} in the {place}, but it was not there. "
                f"Then {n} looked under a tree by the {mark}, and there it was. {n} was happy again. "
                f"From that day on, the {adj} {animal} never lost the {thing} again. The end.")
        return ("story", n, animal), opening, rest
    opening = (f"Long ago, in {_a(place)} near the {mark}, there lived {_a(adj)} {animal} named {n}. "
               f"{n} had {_a(thing)}.")
    rest = (f" {n} loved the {thing} very much. Every evening {n} sat by the {mark} with the {thing}. "
            f"One evening a friend came to the {mark}. The friend asked, \"Can I play with your {thing}?\" "
            f"{n} said, \"Yes, you can.\" So they played with the {thing} by the {mark} until the sun went "
            f"down. Then {n} went home to the {place}. The {adj} {animal} had a new friend. The end.")
    return ("story", n, animal), opening, rest


def counting(rng: random.Random) -> tuple[tuple, str, str]:
    n = rng.choice(NAMES)
    a = rng.randrange(1, 60)
    b = a + rng.randrange(20, 40)
    if rng.random() < 0.5:
        seq = [number_word(i) for i in range(a, b + 1)]
        opening = f"{n} counts from {number_word(a)} to {number_word(b)}."
        rest = " " + _cap(", ".join(seq)) + f". Now {n} is done counting."
        return ("count", n, a, b, "up"), opening, rest
    seq = [number_word(i) for i in range(b, a - 1, -1)]
    opening = f"{n} counts down from {number_word(b)} to {number_word(a)}."
    rest = " " + _cap(", ".join(seq)) + f". Now {n} is done counting."
    return ("count", n, a, b, "down"), opening, rest


def table(rng: random.Random) -> tuple[tuple, str, str]:
    n, k = rng.choice(NAMES), rng.randrange(2, 13)
    kw = number_word(k)
    opening = f"{n} says the table of {kw}."
    lines = [f"{_cap(number_word(i))} times {kw} is {number_word(i * k)}." for i in range(1, 11)]
    rest = " " + " ".join(lines) + f" Now {n} knows the table of {kw}."
    return ("table", n, k), opening, rest


def week(rng: random.Random) -> tuple[tuple, str, str]:
    n, start = rng.choice(NAMES), rng.randrange(7)
    opening = f"{n} has a plan for the week, starting on {DAYS[start]}."
    days = [(start + i) % 7 for i in range(7)]
    rest = " " + " ".join(f"On {DAYS[d]}, {n} {DAY_PLANS[d]}." for d in days) + f" That is the week of {n}."
    return ("week", n, start), opening, rest


def word_list(rng: random.Random) -> tuple[tuple, str, str]:
    n, m = rng.choice(NAMES), rng.choice(NAMES)
    pool = FOODS if rng.random() < 0.5 else OBJECTS
    items = rng.sample(pool, rng.randrange(4, 8))
    listed = ", ".join(items)
    opening = f"{n} writes a list: {listed}."
    rest = (f" {m} reads the list: {listed}. Then {n} reads it again: {listed}. "
            f"The list has {number_word(len(items))} words.")
    return ("list", n, m, tuple(items)), opening, rest


GENRES = (story, counting, table, week, word_list)
GENRE_WEIGHTS = (4, 2, 2, 1, 2)


def _draw(rng: random.Random) -> tuple[tuple, str, str]:
    genre = rng.choices(GENRES, weights=GENRE_WEIGHTS)[0]
    return genre(rng)


HELD_OUT_SEED = 12345
NUM_HELD_OUT = 8


def held_out_examples(count: int = NUM_HELD_OUT) -> list[tuple[tuple, str, str]]:
    """(key, opening, continuation) for the evaluation openings: one of each genre, then stories."""
    rng = random.Random(HELD_OUT_SEED)
    order = [story, counting, table, story, week, counting, story, table][:count]
    while len(order) < count:
        order.append(story)
    return [genre(rng) for genre in order]


def held_out_prompts(count: int = NUM_HELD_OUT) -> list[str]:
    return [opening for _, opening, _ in held_out_examples(count)]


def _blocked_keys() -> set[tuple]:
    """Slot combinations kept out of training: each held-out key and its (genre, name) core."""
    blocked = set()
    for key, _, _ in held_out_examples():
        blocked.add(key)
        blocked.add(key[:3])  # stories by name and animal; counting/table/week by name and first number
    return blocked


def training_documents(count: int, seed: int = 0) -> list[str]:
    """`count` documents (opening + continuation), none sharing a held-out slot combination."""
    rng = random.Random(seed)
    blocked = _blocked_keys()
    docs = []
    while len(docs) < count:
        key, opening, rest = _draw(rng)
        if key in blocked or key[:3] in blocked:
            continue
        docs.append(opening + rest)
    return docs
