"""The README.md (Hugging Face model card) of an export: metadata the Hub reads, and how to embed
queries (zero- and few-shot) and documents with the exported folder in PyTorch tools."""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

from jax_iclemb.data.icl import format_example, format_query
from jax_iclemb.model.hf import is_hub_id

MODEL_PATH = "path/to/this/export"  # what a user replaces with the folder or its Hub id

# Licences of the bases the recipes name, and what they require of a derived model.
ATTRIBUTION = {
    "llama": "Built with Llama. This model is derived from a Llama base model and is subject to "
    "its licence (for Llama 3.1: the Llama 3.1 Community License).",
}


def render(
    *, fmt: str, base: str, model_type: str, instruction: str, step: int, data: str
) -> ModelCard:
    """The card of a `merged` export (sentence-transformers and transformers usage) or of a
    `peft` adapter (peft usage)."""
    metadata = ModelCardData(
        base_model=base if base and is_hub_id(base) else None,
        library_name="sentence-transformers" if fmt == "merged" else "peft",
        pipeline_tag="feature-extraction",
        tags=["jax_iclemb", "bge-en-icl", "text-embeddings", "in-context-learning"],
    )
    query = format_query(instruction, "{query}")
    example = format_example(instruction, "{example query}", "{example answer}")
    usage = _merged_usage(instruction) if fmt == "merged" else _peft_usage()
    body = f"""
# Few-shot text embedder

A decoder trained with jax_iclemb (JAX/Flax) into a text embedder
that learns from examples in its input (the bge-en-icl recipe), exported at step {step} of a run
on `{data}`; base: `{base or "random initialisation"}` ({model_type}). The embedding of a text is
the L2-normalised last hidden state at its final token (EOS, which the tokenizer appends).

Queries carry an instruction, and optionally in-context examples in front:

- zero-shot: `{_escape(query)}\\n<response>`
- few-shot: `{_escape(example)}` once per example, then the zero-shot query.

Documents are embedded as plain text. The instruction used in training:
"{instruction}".

{usage}

## Licence

{ATTRIBUTION.get(model_type, "The base model's licence applies to this model.")}
"""
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n{body}")


def _escape(text: str) -> str:
    return text.replace("\n", "\\n")


def _merged_usage(instruction: str) -> str:
    return f'''## Use with sentence-transformers

The `query` prompt adds the instruction; the tokenizer's chat template adds the
`\\n<response>` suffix and EOS (sentence-transformers 5.4 or later).

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{MODEL_PATH}")
queries = model.encode(["how do I reset my password?"], prompt_name="query")
documents = model.encode(["Open Settings, then Account, then Reset password."])
print(queries @ documents.T)

# Few-shot: the examples and the query as one string (it ends with the suffix, so nothing is
# added again).
instruction = {instruction!r}
example = ("where is my order?", "Track it under Orders in your account.")
few_shot = (
    f"<instruct>{{instruction}}\\n<query>{{example[0]}}\\n<response>{{example[1]}}\\n\\n"
    f"<instruct>{{instruction}}\\n<query>how do I reset my password?\\n<response>"
)
print(model.encode([few_shot]) @ documents.T)
```

## Use with transformers

Pad on the left and take the last position's hidden state; the tokenizer appends EOS.

```python
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{MODEL_PATH}", padding_side="left")
model = AutoModel.from_pretrained("{MODEL_PATH}").eval()
instruction = {instruction!r}
texts = [f"<instruct>{{instruction}}\\n<query>how do I reset my password?\\n<response>"]
batch = tokenizer(texts, padding=True, return_tensors="pt")
with torch.no_grad():
    embeddings = F.normalize(model(**batch).last_hidden_state[:, -1], dim=-1)
```'''


def _peft_usage() -> str:
    return f'''## Use with peft

```python
from peft import PeftModel
from transformers import AutoModel, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{MODEL_PATH}", padding_side="left")
base = AutoModel.from_pretrained("<the base in adapter_config.json>")
model = PeftModel.from_pretrained(base, "{MODEL_PATH}").eval()
```

Then embed as with the merged model: the last position's hidden state, L2-normalised.'''
