"""The paper's MTEB protocol (bge-en-icl): each task's instruction and fixed in-context examples.

The data ships in the package, `jax_iclemb/protocols/mteb_icl/` (source and licence in its
NOTICE): `instructions.json` (by task type, by task name, the CQADupstack prefix and the paper's
MTEB (English) task list) and `examples/<Task>.json`. Lookups follow FlagEmbedding's rules:
an instruction by task type (STS, Summarization, BitextMining), else for CQADupstack retrieval
tasks the shared CQADupstack one, else by name within the type, where retrieval tasks also
answer to BEIR's names.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from typing import Any

from jax_iclemb.beir import load_examples

PROTOCOL = importlib.resources.files("jax_iclemb") / "protocols" / "mteb_icl"
# BEIR names that a lower-case match of the MTEB names misses (the `note` of instructions.json).
BEIR_ALIASES = {
    "trec-covid": "TRECCOVID",
    "climate-fever": "ClimateFEVER",
    "dbpedia-entity": "DBPedia",
    "webis-touche2020": "Touche2020",
    "fiqa": "FiQA2018",
    "quora": "QuoraRetrieval",
}
# The 12 CQADupstack sub-forum tasks share the examples of the one task they were in MTEB v1.
CQADUPSTACK_EXAMPLES = "CQADupstackRetrieval"


@functools.cache
def instructions() -> dict[str, Any]:
    """instructions.json as shipped."""
    return json.loads((PROTOCOL / "instructions.json").read_text(encoding="utf-8"))


def paper_tasks() -> dict[str, list[str]]:
    """The MTEB (English) tasks the paper reports, by type (CQADupstack as its 12 sub-forums)."""
    return instructions()["mteb_eng_56_tasks_by_type"]


def _is_cqadupstack(task_name: str, task_type: str) -> bool:
    return task_type == "Retrieval" and task_name.lower().startswith("cqadupstack")


def _protocol_name(task_name: str, task_type: str) -> str:
    """The name the protocol files use for a task (BEIR and lower-case retrieval names mapped)."""
    if task_type != "Retrieval":
        return task_name
    if _is_cqadupstack(task_name, task_type):
        return CQADUPSTACK_EXAMPLES
    names = {name.lower(): name for name in instructions()["by_task"]["Retrieval"]}
    return BEIR_ALIASES.get(task_name) or names.get(task_name.lower(), task_name)


def instruction(task_name: str, task_type: str) -> str | None:
    """The paper's instruction for a task of an mteb task type, or None if it has none."""
    data = instructions()
    if task_type in data["by_task_type"]:
        return data["by_task_type"][task_type]
    if _is_cqadupstack(task_name, task_type):
        return data["cqadupstack_prefix"]
    return data["by_task"].get(task_type, {}).get(_protocol_name(task_name, task_type))


def examples(task_name: str, task_type: str) -> list[dict[str, str]] | None:
    """The paper's in-context examples for a task, or None if it has none."""
    resource = PROTOCOL / "examples" / f"{_protocol_name(task_name, task_type)}.json"
    if not resource.is_file():
        return None
    with importlib.resources.as_file(resource) as path:
        return load_examples(path)
