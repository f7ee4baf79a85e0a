"""The built-in training data: a small made-up world and four tasks in the reference JSONL format.

It is the default data of the smoke configs, so it must be learnable in a few minutes by a tiny
random-initialised model: short texts whose structure is mostly lexical (entity names, attribute
words, topic keywords). All text is generated here from fixed word lists and a fixed seed.

Tasks (one JSONL file each) and their evaluation examples (`eval_examples/<Task>.json`):
- retrieval/world_facts (normal, with teacher scores): a question about a person -> the fact.
- sts/world_paraphrase (symmetric_sts): a fact -> the same fact worded differently.
- classification-no_in_batch_neg/help_desk_intents (symmetric_class): a message -> its intent text.
- clustering-no_in_batch_neg/report_titles (symmetric_clustering): a title -> a title of the same
  field; `category` is "field.subfield".
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

VERSION = 1  # bump whenever the generated content changes: it names the cache folder
SEED = 20250101
RECORDS_PER_TASK = 600
EVAL_EXAMPLES = 5

# ----------------------------------------------------------------------------- the world

SYLLABLES = ("ka", "lo", "mi", "ren", "tor", "vel", "zan", "qui", "bor", "fen", "sa", "dru")
NUM_PEOPLE = 240

# relation -> (values, fact templates, question templates); every value is one distinct word.
RELATIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "job": (
        ("baker", "tailor", "pilot", "farmer", "nurse", "painter", "miner", "sailor", "potter"),
        ("{n} works as a {v}.", "{n} earns a living as a {v}.", "By trade, {n} is a {v}."),
        ("What is the job of {n}?", "What does {n} do for a living?", "Which trade does {n} have?"),
    ),
    "town": (
        ("Telmora", "Quessin", "Varnholt", "Brindlecove", "Osterau", "Mirrowick", "Palvane"),
        ("{n} lives in {v}.", "{n} has a house in the town of {v}.", "Home for {n} is {v}."),
        ("Where does {n} live?", "Which town is home to {n}?", "In what town does {n} reside?"),
    ),
    "pet": (
        ("cat", "parrot", "goat", "tortoise", "rabbit", "hedgehog", "ferret", "pony"),
        ("{n} keeps a {v} as a pet.", "{n} looks after a pet {v}.", "The pet of {n} is a {v}."),
        (
            "What pet does {n} have?",
            "Which animal does {n} keep?",
            "What kind of pet is owned by {n}?",
        ),
    ),
    "colour": (
        ("crimson", "teal", "amber", "violet", "olive", "scarlet", "indigo", "ivory"),
        ("The favourite colour of {n} is {v}.", "{n} likes {v} best.", "{n} always wears {v}."),
        ("Which colour does {n} like most?", "What is the favourite colour of {n}?"),
    ),
    "food": (
        ("plums", "barley", "figs", "lentils", "cheese", "honey", "noodles", "pears", "walnuts"),
        (
            "{n} loves to eat {v}.",
            "For supper {n} always has {v}.",
            "The best food for {n} is {v}.",
        ),
        (
            "What food does {n} enjoy?",
            "What does {n} like to eat?",
            "Which dish is a favourite of {n}?",
        ),
    ),
}


def make_people(rng: random.Random) -> dict[str, dict[str, str]]:
    """NUM_PEOPLE made-up names -> one value per relation. Names sharing a first syllable look
    alike, which makes them good hard negatives for each other."""
    names: set[str] = set()
    while len(names) < NUM_PEOPLE:
        parts = rng.sample(SYLLABLES, rng.choice((2, 3)))
        names.add("".join(parts).capitalize())
    return {
        name: {rel: rng.choice(values) for rel, (values, _, _) in RELATIONS.items()}
        for name in sorted(names)
    }


def fact(rng: random.Random, name: str, rel: str, value: str, template: int | None = None) -> str:
    templates = RELATIONS[rel][1]
    t = templates[rng.randrange(len(templates))] if template is None else templates[template]
    return t.format(n=name, v=value)


def _similar(people: dict[str, dict[str, str]], name: str) -> list[str]:
    prefix = name[:2].lower()
    return [p for p in people if p != name and p.lower().startswith(prefix)]


def _fact_negatives(
    rng: random.Random,
    people: dict[str, dict[str, str]],
    name: str,
    rel: str,
    template: int | None = None,
) -> list[tuple[str, float]]:
    """7 hard negatives with teacher scores: look-alike people with another value of the same
    relation, the same person's other relations, random people with another value."""
    value = people[name][rel]
    others = [p for p in people if people[p][rel] != value]
    similar = [p for p in _similar(people, name) if people[p][rel] != value]
    lookalikes = rng.sample(similar, min(3, len(similar)))
    randoms = rng.sample([p for p in others if p not in lookalikes], 7 - 2 - len(lookalikes))
    own = rng.sample([r for r in RELATIONS if r != rel], 2)
    negs = [
        (fact(rng, p, rel, people[p][rel], template), rng.uniform(0.2, 0.45)) for p in lookalikes
    ]
    negs += [(fact(rng, name, r, people[name][r], template), rng.uniform(0.3, 0.55)) for r in own]
    negs += [(fact(rng, p, rel, people[p][rel], template), rng.uniform(0.0, 0.2)) for p in randoms]
    rng.shuffle(negs)
    return negs


def retrieval_task(rng: random.Random, people: dict[str, dict[str, str]]) -> tuple[list, list]:
    prompt = "Given a question about a person, retrieve the sentence that answers it."
    pairs = rng.sample(
        [(n, r) for n in people for r in RELATIONS], RECORDS_PER_TASK + EVAL_EXAMPLES
    )
    records, examples = [], []
    for name, rel in pairs:
        query = rng.choice(RELATIONS[rel][2]).format(n=name)
        pos = fact(rng, name, rel, people[name][rel])
        negs = _fact_negatives(rng, people, name, rel)
        records.append(
            {
                "query": query,
                "pos": [pos],
                "neg": [t for t, _ in negs],
                "pos_scores": [round(rng.uniform(0.85, 0.99), 4)],
                "neg_scores": [round(s, 4) for _, s in negs],
                "prompt": prompt,
                "type": "normal",
            }
        )
        examples.append({"query": query, "response": pos})
    return records[:RECORDS_PER_TASK], examples[RECORDS_PER_TASK:]


def sts_task(rng: random.Random, people: dict[str, dict[str, str]]) -> tuple[list, list]:
    prompt = "Retrieve a sentence that says the same thing in other words."
    pairs = rng.sample(
        [(n, r) for n in people for r in RELATIONS], RECORDS_PER_TASK + EVAL_EXAMPLES
    )
    records, examples = [], []
    for name, rel in pairs:
        qt, pt = rng.sample(range(len(RELATIONS[rel][1])), 2)
        query = fact(rng, name, rel, people[name][rel], qt)
        pos = fact(rng, name, rel, people[name][rel], pt)
        # Negatives use the positive's wording, so only the content tells them apart.
        negs = _fact_negatives(rng, people, name, rel, pt)
        records.append(
            {
                "query": query,
                "pos": [pos],
                "neg": [t for t, _ in negs],
                "prompt": prompt,
                "type": "symmetric_sts",
            }
        )
        examples.append({"query": query, "response": pos})
    return records[:RECORDS_PER_TASK], examples[RECORDS_PER_TASK:]


# ----------------------------------------------------------------------------- help-desk intents

SLOTS = {
    "town": RELATIONS["town"][0],
    "pet": RELATIONS["pet"][0],
    "job": RELATIONS["job"][0],
    "food": RELATIONS["food"][0],
    "colour": RELATIONS["colour"][0],
    "day": ("Monday", "Tuesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "tool": ("lute", "drum", "flute", "harp", "fiddle"),
    "part": ("knee", "back", "tooth", "ear", "wrist"),
}

# intent -> (the class text used as positive, message templates over SLOTS)
INTENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "lost_pet": (
        "I have lost my pet.",
        ("My {pet} ran away in {town}.", "Has anyone seen my {pet}?", "I cannot find my {pet}."),
    ),
    "job_search": (
        "I am looking for work.",
        ("Is there work for a {job} in {town}?", "I want a job as a {job}.", "Who hires a {job}?"),
    ),
    "move_house": (
        "I want to move to another town.",
        ("How do I move my family to {town}?", "I plan to leave {town} by {day}."),
    ),
    "weather": (
        "What will the weather be like?",
        ("Will it rain in {town} on {day}?", "Is it going to be cold in {town} this {day}?"),
    ),
    "buy_food": (
        "Where can I buy food?",
        ("Where can I buy fresh {food} in {town}?", "Which market sells {food}?"),
    ),
    "music_lesson": (
        "I want to learn to play an instrument.",
        ("Who teaches the {tool} in {town}?", "Can I take {tool} lessons on {day}?"),
    ),
    "paint_house": (
        "I want my house painted.",
        ("Can someone paint my door {colour}?", "I need {colour} paint for my walls."),
    ),
    "travel_ticket": (
        "I need a ticket for a trip.",
        ("How much is a boat ticket to {town}?", "Book me a seat to {town} on {day}."),
    ),
    "see_doctor": (
        "I need to see a doctor.",
        ("My {part} hurts since {day}.", "Is there a doctor in {town} for my {part}?"),
    ),
    "party_invite": (
        "I am inviting people to a party.",
        ("Come to my party in {town} on {day}!", "Join our {colour} dinner party on {day}."),
    ),
}


def _fill(rng: random.Random, template: str) -> str:
    return template.format(**{k: rng.choice(v) for k, v in SLOTS.items()})


def classification_task(rng: random.Random) -> tuple[list, list]:
    prompt = "Given a message sent to a village help desk, find its intent."
    labels = list(INTENTS)
    # Balanced classes for training; evaluation examples of distinct intents.
    intents = [labels[i % len(labels)] for i in range(RECORDS_PER_TASK)]
    intents += rng.sample(labels, EVAL_EXAMPLES)
    records, examples = [], []
    for intent in intents:
        text, templates = INTENTS[intent]
        query = _fill(rng, rng.choice(templates))
        negs = [INTENTS[other][0] for other in labels if other != intent]
        rng.shuffle(negs)
        records.append(
            {
                "query": query,
                "pos": [text],
                "neg": negs,
                "prompt": prompt,
                "type": "symmetric_class",
            }
        )
        examples.append({"query": query, "response": intent})
    train = records[:RECORDS_PER_TASK]
    rng.shuffle(train)  # the loop above cycles through the intents in order
    return train, examples[RECORDS_PER_TASK:]


# ----------------------------------------------------------------------------- report titles

# field.subfield -> keywords that only titles of that subfield use
SUBFIELDS: dict[str, tuple[str, ...]] = {
    "sky.comets": ("comet", "tail", "orbit", "ice"),
    "sky.tides": ("moon", "tide", "shore", "flood"),
    "farm.grain": ("wheat", "harvest", "mill", "sowing"),
    "farm.herds": ("sheep", "cattle", "grazing", "wool"),
    "craft.looms": ("loom", "thread", "weaving", "dye"),
    "craft.kilns": ("kiln", "clay", "glaze", "firing"),
    "sea.ships": ("hull", "mast", "sail", "harbour"),
    "sea.fish": ("herring", "nets", "catch", "trawling"),
    "song.choirs": ("choir", "hymn", "chorus", "voices"),
    "song.drums": ("rhythm", "drumming", "beat", "dance"),
}
TITLE_TEMPLATES = (
    "Notes on {a} and {b} in {town}",
    "A short history of {a} near {town}",
    "How {a} shapes {b}",
    "The {a} and the {b}: a survey",
    "{A} in {town}: first observations",
    "Why {a} matters for {b}",
)


def clustering_task(rng: random.Random) -> tuple[list, list]:
    prompt = "Identify the field and subfield of a village report from its title."
    cats = list(SUBFIELDS)
    pool: dict[str, list[str]] = {c: [] for c in cats}
    seen: set[str] = set()
    total = RECORDS_PER_TASK + EVAL_EXAMPLES
    while sum(map(len, pool.values())) < total:
        cat = cats[sum(map(len, pool.values())) % len(cats)]
        a, b = rng.sample(SUBFIELDS[cat], 2)
        title = rng.choice(TITLE_TEMPLATES).format(
            a=a, b=b, A=a.capitalize(), town=rng.choice(SLOTS["town"])
        )
        if title not in seen:  # a title must not be its own positive
            seen.add(title)
            pool[cat].append(title)
    records, examples = [], []
    for cat in cats:
        for title in pool[cat]:
            others = [t for c in cats if c != cat for t in pool[c]]
            records.append(
                {
                    "query": title,
                    "pos": [rng.choice([t for t in pool[cat] if t != title])],
                    "neg": rng.sample(others, 9),
                    "category": cat,
                    "prompt": prompt,
                    "type": "symmetric_clustering",
                }
            )
    rng.shuffle(records)
    for r in records[RECORDS_PER_TASK:]:
        examples.append({"query": r["query"], "response": r["category"]})
    return records[:RECORDS_PER_TASK], examples


# ----------------------------------------------------------------------------- files

TASKS = {
    # file (without .jsonl) -> evaluation task name
    "retrieval/world_facts": "WorldFactsRetrieval",
    "sts/world_paraphrase": "WorldParaphraseSTS",
    "classification-no_in_batch_neg/help_desk_intents": "HelpDeskIntentClassification",
    "clustering-no_in_batch_neg/report_titles": "ReportTitleClustering",
}


def generate(out: Path, seed: int = SEED) -> None:
    """Writes every task's JSONL file and eval examples under `out` (deterministic in `seed`)."""
    rng = random.Random(seed)
    people = make_people(rng)
    results = [
        retrieval_task(rng, people),
        sts_task(rng, people),
        classification_task(rng),
        clustering_task(rng),
    ]
    (out / "eval_examples").mkdir(parents=True, exist_ok=True)
    for (file, task), (records, examples) in zip(TASKS.items(), results, strict=True):
        path = out / f"{file}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        (out / "eval_examples" / f"{task}.json").write_text(
            json.dumps(examples, indent=2) + "\n", encoding="utf-8"
        )


def default_root() -> Path:
    return Path(os.environ.get("JAX_ICLEMB_CACHE") or "~/.cache/jax_iclemb").expanduser()


def generated_dir(
    root: str | Path | None, name: str, generate: Callable[[Path], None]
) -> Path:
    """`root/name`, written by `generate(folder)` on first use (root default: the cache).

    Written to a temporary folder and renamed into place, so concurrent processes (or an
    interrupted run) never see a half-written folder.
    """
    root = Path(root).expanduser() if root is not None else default_root()
    final = root / name
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        generate(tmp / "data")
        os.rename(tmp / "data", final)
    except OSError:
        if not final.is_dir():  # not a lost race with another process: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def builtin_data_dir(root: str | Path | None = None) -> Path:
    """The built-in dataset's folder under `root`, generated on first use."""
    return generated_dir(root, f"builtin-v{VERSION}", generate)
