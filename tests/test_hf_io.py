"""Hugging Face import/export: round trips through torch transformers and peft, bad inputs,
loading Hub ids from a local fake of the Hub."""

import json
import logging
import shutil

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from fake_hub import COMMITS, files_under, install
from flax import nnx
from jax.sharding import PartitionSpec
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from jax_iclemb.config import default_config
from jax_iclemb.errors import MissingPath
from jax_iclemb.model import (
    FROZEN,
    LoraConfig,
    ModelConfig,
    export_merged,
    export_peft,
    load_lora_state,
    load_peft,
    load_pretrained,
    lora_state,
)
from jax_iclemb.model.build import build_model
from jax_iclemb.model.hf import HUB_META_FILES, read_checkpoint
from jax_iclemb.parallel import make_mesh

TOL = 1e-4
BASE_VOCAB, VOCAB = 128, 131  # a tokenizer with 3 added special tokens
LENGTHS = [9, 5, 7]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=BASE_VOCAB,
        initializer_range=0.1,
        sliding_window=4,
    )
    transformers.MistralForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sequences():
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, VOCAB, n).tolist() for n in LENGTHS]
    seqs[0][-3:] = [128, 129, 130]  # the appended rows must be used
    return seqs


@pytest.fixture(scope="module")
def trained(base_dir, sequences):
    """An imported model with extended vocabulary and non-zero adapters, and its hidden states."""
    model, cfg = load_pretrained(
        base_dir,
        lora=LoraConfig(rank=4, alpha=8.0, dropout=0.1),
        vocab_size=VOCAB,
        dtype="float32",
        param_dtype="float32",
    )
    noisy = jax.tree.map(
        lambda x: 0.2 * jax.random.normal(jax.random.key(2), x.shape), lora_state(model)
    )
    load_lora_state(model, noisy)
    model.eval()
    length = max(LENGTHS)
    tokens = np.zeros((len(sequences), length), np.int32)
    segments = np.zeros_like(tokens)
    positions = np.zeros_like(tokens)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)], segments[i, : len(s)], positions[i, : len(s)] = s, 1, range(len(s))
    hidden = np.asarray(nnx.jit(lambda m, *a: m(*a))(model, tokens, positions, segments))
    return model, cfg, [hidden[i, : len(s)] for i, s in enumerate(sequences)]


def torch_hidden(model, sequences):
    """Hidden states of a torch model on a left-padded batch."""
    width = max(map(len, sequences))
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, width - len(s) :], mask[i, width - len(s) :] = torch.tensor(s), 1
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    return [out[i, width - len(s) :] for i, s in enumerate(sequences)]


def test_vocabulary_extension_appends_mean_rows(trained, base_dir):
    model, cfg, _ = trained
    assert (cfg.vocab_size, cfg.base_vocab_size) == (VOCAB, BASE_VOCAB)
    original = load_file(base_dir / "model.safetensors")["model.embed_tokens.weight"].numpy()
    table = np.asarray(model.embed_tokens.weight.get_value())
    np.testing.assert_array_equal(table[:BASE_VOCAB], original)
    for row in table[BASE_VOCAB:]:
        np.testing.assert_allclose(row, original.mean(axis=0), atol=1e-6)


def test_export_merged_loads_in_transformers_and_matches(trained, sequences, tmp_path):
    model, cfg, expected = trained
    out = export_merged(model, cfg, tmp_path / "merged", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MistralModel"]
    loaded, info = transformers.AutoModel.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for got, want in zip(torch_hidden(loaded.eval(), sequences), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)

    # And the sharded export imports back, each weight equal to W + (alpha/r) B A.
    back, back_cfg = load_pretrained(out, dtype="float32", param_dtype="float32")
    assert back_cfg.vocab_size == VOCAB and back_cfg.sliding_window == 4
    q = model.layers.self_attn.q_proj  # stacked: [layers, out, in]
    merged = q.weight.get_value()[1] + 2.0 * q.lora_b.get_value()[1] @ q.lora_a.get_value()[1]
    np.testing.assert_allclose(
        back.layers.self_attn.q_proj.weight.get_value()[1], merged, atol=1e-6
    )


def test_export_peft_loads_in_peft_and_matches(trained, sequences, base_dir, tmp_path):
    model, cfg, expected = trained
    out = export_peft(model, cfg, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    base = transformers.AutoModel.from_pretrained(base_dir, dtype=torch.float32)
    base.resize_token_embeddings(cfg.vocab_size)  # documented: resize to len(tokenizer) first
    adapted = peft.PeftModel.from_pretrained(base, out).eval()
    assert adapted.peft_config["default"].task_type == "FEATURE_EXTRACTION"
    for got, want in zip(torch_hidden(adapted, sequences), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 5e5,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
CONFIG_CASES = [
    ("MistralConfig", dict(sliding_window=7)),
    ("LlamaConfig", dict(rope_parameters=LLAMA3, attention_bias=True)),
    ("Qwen2Config", dict(tie_word_embeddings=True)),
    ("Qwen3Config", dict(head_dim=24)),
]
COMPARED = (
    "hidden_size",
    "num_key_value_heads",
    "head_dim",
    "rope_parameters",
    "tie_word_embeddings",
    "sliding_window",
    "attention_bias",
    "rms_norm_eps",
)


@pytest.mark.parametrize(("name", "options"), CONFIG_CASES)
def test_config_round_trips_through_transformers(name, options):
    config_class = getattr(transformers, name)
    hf = config_class(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, **options)
    hf = hf.to_dict()
    cfg = ModelConfig.from_hf(hf)
    again = config_class(**cfg.to_hf()).to_dict()
    for key in COMPARED:
        assert again.get(key) == hf.get(key) or key not in hf, key
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_unsupported_architecture_lists_supported_ones(tmp_path):
    with pytest.raises(ValueError, match=r"'gpt2'.*llama.*mistral.*qwen2.*qwen3"):
        ModelConfig.from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"'bert'.*supported model types"):
        load_pretrained(tmp_path)


def _rewrite(base_dir, folder, edit):
    shutil.copytree(base_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_missing_and_misshaped_tensors_are_named(base_dir, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    missing = _rewrite(base_dir, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(MissingPath, match=r"layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(missing)
    bad = _rewrite(base_dir, tmp_path / "bad", lambda t: t.__setitem__(name, torch.zeros(128, 60)))
    with pytest.raises(
        ValueError, match=r"layers\.1\.mlp\.up_proj\.weight.*\(128, 60\).*\(128, 64\)"
    ):
        load_pretrained(bad)
    with pytest.raises(ValueError, match=r"vocab_size=100.*128"):
        load_pretrained(base_dir, vocab_size=100)


def test_export_refuses_a_non_empty_folder(trained, tmp_path):
    model, cfg, _ = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        export_merged(model, cfg, out)
    with pytest.raises(FileExistsError, match="not empty"):
        export_peft(model, cfg, out, base_model_name_or_path="base")
    export_merged(model, cfg, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"
    assert set(read_checkpoint(out)) >= {"embed_tokens.weight", "norm.weight"}
    # Overwriting with the other kind leaves no model files that would make it look like both.
    export_peft(model, cfg, out, base_model_name_or_path="base", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "notes.txt"
    ]


def test_import_onto_a_mesh_streams_into_shards(trained, base_dir):
    model, _, _ = trained
    mesh = make_mesh((2, 2, 2))
    sharded, _ = load_pretrained(
        base_dir, lora=LoraConfig(rank=4), vocab_size=VOCAB, mesh=mesh, param_dtype="float32"
    )
    q = sharded.layers.self_attn.q_proj.weight.get_value()
    assert q.sharding.spec == PartitionSpec(None, "tensor", "fsdp")  # all layers on each device
    table = sharded.embed_tokens.weight.get_value()
    assert table.sharding.spec == PartitionSpec(None, "fsdp")  # 131 rows: not split over tensor
    for path, var in nnx.to_flat_state(nnx.state(sharded, FROZEN)):
        want = nnx.state(model, FROZEN)
        for p in path:
            want = want[p]
        np.testing.assert_array_equal(var.get_value(), want.get_value(), err_msg=str(path))


def test_bfloat16_checkpoints_read_and_write_as_torch_does(base_dir, tmp_path):
    torch_model = transformers.AutoModel.from_pretrained(base_dir, dtype=torch.bfloat16)
    torch_model.save_pretrained(tmp_path / "bf16")
    model, _ = load_pretrained(tmp_path / "bf16", param_dtype="bfloat16")
    want = torch_model.layers[1].mlp.up_proj.weight.detach().view(torch.int16).numpy()
    got = np.asarray(model.layers.mlp.up_proj.weight.get_value()[1])
    assert got.dtype.name == "bfloat16"
    np.testing.assert_array_equal(got.view(np.int16), want)  # bit for bit

    out = export_merged(model, model.config, tmp_path / "out")
    written = load_file(out / "model.safetensors")["layers.1.mlp.up_proj.weight"]
    assert written.dtype == torch.bfloat16
    np.testing.assert_array_equal(written.view(torch.int16).numpy(), want)
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}  # what transformers checks before loading
    assert transformers.AutoConfig.from_pretrained(out).dtype == torch.bfloat16


def test_legacy_config_keys_are_read_through_transformers(base_dir, tmp_path):
    folder = shutil.copytree(base_dir, tmp_path / "legacy")
    hf = json.loads((folder / "config.json").read_text())
    del hf["rope_parameters"]  # a transformers 4 config: rope_theta on top, `rope_scaling`
    hf.update(model_type="llama", architectures=["LlamaForCausalLM"], rope_theta=5e5,
              rope_scaling={k: v for k, v in LLAMA3.items() if k != "rope_theta"})
    (folder / "config.json").write_text(json.dumps(hf))
    _, cfg = load_pretrained(folder, dtype="float32", param_dtype="float32")
    assert (cfg.model_type, cfg.rope_theta, cfg.rope_scaling.factor) == ("llama", 5e5, 8.0)
    (folder / "config.json").write_text(json.dumps({**hf, "model_type": "no-such-family"}))
    with pytest.raises(ValueError, match=r"no-such-family.*supported model types.*mistral"):
        load_pretrained(folder)


# ---- Hub ids, against a local fake of the Hub ----

@pytest.fixture
def hub(tmp_path, monkeypatch):
    return install(tmp_path / "hub-cache", monkeypatch)


def assert_same_params(got, want):
    want = dict(nnx.to_flat_state(nnx.state(want, nnx.Param)))
    got = dict(nnx.to_flat_state(nnx.state(got, nnx.Param)))
    assert got.keys() == want.keys()
    for path, var in got.items():
        np.testing.assert_array_equal(var.get_value(), want[path].get_value(), err_msg=str(path))


def test_hub_model_downloads_its_files_at_the_revision(trained, base_dir, hub, tmp_path, caplog):
    model, cfg, _ = trained
    repo = export_merged(model, cfg, tmp_path / "repo", max_shard_size="40KB")
    shards = sorted(set(json.loads((repo / "model.safetensors.index.json").read_text())[
        "weight_map"].values()))
    (repo / "tokenizer.json").write_text("{}")
    # What the repository holds besides: a consolidated copy, other formats, nested configs.
    shutil.copy(repo / shards[0], repo / "consolidated.safetensors")
    (repo / "pytorch_model.bin").write_bytes(b"torch")
    (repo / "original").mkdir()
    (repo / "original" / "config.json").write_text("{}")
    hub.publish("owner/model", base_dir, "main")  # another vocabulary: the revision must count
    hub.publish("owner/model", repo, "v1")

    with caplog.at_level(logging.DEBUG):
        got, got_cfg = load_pretrained("owner/model", revision="v1", token="hf_secret",
                                       vocab_size=VOCAB, dtype="float32", param_dtype="float32")
    want, want_cfg = load_pretrained(repo, dtype="float32", param_dtype="float32")
    assert got_cfg == want_cfg and got_cfg.vocab_size == VOCAB
    assert_same_params(got, want)
    snapshot = hub.snapshot("owner/model", "v1")
    assert files_under(snapshot) == sorted(
        ["config.json", "model.safetensors.index.json", "tokenizer.json", *shards]
    )
    # Configs first at the asked revision, then the weights of that same commit.
    assert [(c["revision"], c["token"]) for c in hub.calls] == [
        ("v1", "hf_secret"), (COMMITS["v1"], "hf_secret")
    ]
    assert hub.calls[0]["allow_patterns"] == list(HUB_META_FILES)
    assert hub.calls[1]["allow_patterns"] == shards
    assert "hf_secret" not in caplog.text

    hub.calls.clear()
    _, main_cfg = load_pretrained("owner/model", dtype="float32", param_dtype="float32")
    assert main_cfg.vocab_size == BASE_VOCAB
    assert [(c["revision"], c["token"]) for c in hub.calls] == [
        (None, None), (COMMITS["main"], None)  # None: huggingface_hub's own login or $HF_TOKEN
    ]
    assert files_under(hub.snapshot("owner/model")) == ["config.json", "model.safetensors"]


def test_hub_adapter_id_resolves_its_hub_base_at_its_revision(trained, base_dir, hub, tmp_path):
    model, cfg, _ = trained
    adapter = export_peft(model, cfg, tmp_path / "adapter", base_model_name_or_path="owner/base",
                          revision="v1")
    # PEFT's field for the base model's revision
    assert json.loads((adapter / "adapter_config.json").read_text())["revision"] == "v1"
    hub.publish("owner/adapter", adapter)
    hub.publish("owner/base", base_dir, "v1")  # no main: only the adapter's revision loads

    got, got_cfg = load_peft("owner/adapter", vocab_size=VOCAB, token="hf_secret",
                             dtype="float32", param_dtype="float32")
    assert got_cfg == cfg
    assert_same_params(got, model)
    assert [(c["repo"], c["revision"], c["token"]) for c in hub.calls] == [
        ("owner/adapter", None, "hf_secret"),
        ("owner/adapter", COMMITS["main"], "hf_secret"),
        ("owner/base", "v1", "hf_secret"),
        ("owner/base", COMMITS["v1"], "hf_secret"),
    ]
    snapshot = hub.snapshot("owner/adapter")
    assert files_under(snapshot) == ["adapter_config.json", "adapter_model.safetensors"]


def test_training_builds_its_hub_base_at_the_configured_revision(trained, base_dir, hub, tmp_path):
    """`model.hf_path` a Hub id, `model.revision` a tag: the run starts from that revision's
    weights (main holds another model)."""
    model, cfg, _ = trained
    repo = export_merged(model, cfg, tmp_path / "repo")
    hub.publish("owner/model", base_dir, "main")
    hub.publish("owner/model", repo, "v1")
    section = default_config().model
    section.hf_path, section.revision = "owner/model", "v1"
    section.dtype = section.param_dtype = "float32"
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    got, _ = build_model(section, None, seed=0, mesh=mesh, vocab_size=VOCAB)
    want, _ = load_pretrained(repo, dtype="float32", param_dtype="float32")
    assert_same_params(got, want)
    assert [c["revision"] for c in hub.calls] == ["v1", COMMITS["v1"]]


def test_hub_adapter_id_with_its_base_inside_the_repository(trained, hub, tmp_path):
    model, cfg, _ = trained
    # A random-init run's export: the LoRA-free base in base/, named relatively.
    adapter = export_peft(model, cfg, tmp_path / "adapter", base_model_name_or_path="base")
    export_merged(model, cfg, adapter / "base", merge_lora=False)
    hub.publish("owner/adapter", adapter)

    got, got_cfg = load_peft("owner/adapter", dtype="float32", param_dtype="float32")
    assert got_cfg == cfg.replace(base_vocab_size=None)  # base/ has the extended vocabulary
    assert_same_params(got, model)
    assert [c["repo"] for c in hub.calls] == ["owner/adapter"] * 2
    assert hub.calls[1]["allow_patterns"] == ["adapter_model.safetensors", "base/*"]


def test_hub_failures_say_what_went_wrong(trained, hub, tmp_path):
    model, cfg, _ = trained
    with pytest.raises(FileNotFoundError, match=r"owner/nope.*Hub download failed.*404"):
        load_pretrained("owner/nope")
    adapter = export_peft(model, cfg, tmp_path / "adapter", base_model_name_or_path="owner/base")
    hub.publish("owner/adapter", adapter)
    with pytest.raises(FileNotFoundError, match=r"config.json not found.*PEFT adapter.*load_peft"):
        load_pretrained("owner/adapter")
