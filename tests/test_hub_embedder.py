"""Embedder.from_pretrained on Hub ids (a local fake of the Hub): an exported adapter repository
whose base lives inside it, loaded at a revision, gives the training workdir's embeddings."""

import numpy as np
from fake_hub import COMMITS, files_under, install

from jax_iclemb.embedder import Embedder
from jax_iclemb.export import main as export_main

PASSAGES = ["Carla Diaz lives in Lyon.", "A dog.", "Tom is a pilot."]


def test_embedder_loads_a_hub_adapter_at_a_revision(tiny_workdir, tmp_path, monkeypatch):
    adapter = tmp_path / "adapter"
    assert export_main(["--workdir", str(tiny_workdir), "--out", str(adapter),
                        "--format", "peft"]) == 0
    hub = install(tmp_path / "hub-cache", monkeypatch)
    hub.publish("owner/embedder", adapter, "v1")

    got = Embedder.from_pretrained("owner/embedder", revision="v1", progress=False)
    want = Embedder.from_pretrained(tiny_workdir, progress=False)
    np.testing.assert_allclose(
        got.encode_corpus(PASSAGES), want.encode_corpus(PASSAGES), atol=1e-5
    )
    assert [c["revision"] for c in hub.calls] == ["v1", COMMITS["v1"]]
    files = files_under(hub.snapshot("owner/embedder", "v1"))
    # The adapter, its tokenizer, and the base next to it; not the model card.
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
            "base/config.json", "base/model.safetensors"} <= set(files)
    assert "README.md" not in files
