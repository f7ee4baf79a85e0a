"""Config loading, overrides and validation: every mistake names its key and what is allowed."""

import json
from pathlib import Path

import pytest

from jax_iclemb.config import (
    HF_CONFIG_KEYS,
    ConfigError,
    default_config,
    from_json,
    load_config,
    recipe_names,
    to_json,
    validate,
)
from jax_iclemb.model.config import ModelConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(p for p in CONFIGS.glob("*.py") if not p.stem.startswith("_"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_configs_validate(path):
    config = load_config(path)
    assert config.data.train_group_size >= 2


def test_recipes_load_by_name():
    assert recipe_names() == [p.stem for p in RECIPES]
    by_path = load_config(CONFIGS / "tiny.py", ["--config.train.steps=7"])
    for name in ("tiny", "tiny.py"):
        assert load_config(name, ["--config.train.steps=7"]).to_dict() == by_path.to_dict()
    with pytest.raises(ConfigError, match=r"tyni.*not a recipe name.*bge_en_icl_mistral7b.*tiny"):
        load_config("tyni")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("some/dir/tiny.py")  # a path that is not there never falls back to a recipe


def test_paper_recipe_values():
    c = load_config(CONFIGS / "bge_en_icl_mistral7b.py")
    assert (c.lora.rank, c.lora.alpha, c.lora.dropout) == (64, 32.0, 0.1)
    assert c.loss.temperature == 0.02 and c.data.train_group_size == 8
    assert (c.data.query_max_len, c.data.passage_max_len) == (2048, 512)
    assert (c.data.example_query_max_len, c.data.example_passage_max_len) == (256, 256)
    assert (c.optim.lr, c.optim.warmup_steps, c.optim.decay) == (1e-4, 100, "linear")
    assert (c.optim.weight_decay, c.optim.grad_clip) == (0.0, 1.0)
    assert c.data.max_examples == 5 and c.model.attention == "causal"


def test_overrides_are_typed():
    c = load_config(
        CONFIGS / "tiny.py",
        ["--config.train.steps=7", "--config.optim.lr=1", "--config.train.mesh=(2,-1,1)",
         "--config.data.path=/x/y", "--config.model.arch.num_hidden_layers=3"],
    )
    assert c.train.steps == 7 and c.optim.lr == 1.0 and isinstance(c.optim.lr, float)
    assert c.train.mesh == (2, -1, 1) and c.data.path == "/x/y"
    assert c.model.arch.num_hidden_layers == 3


def test_unknown_key_names_itself_and_the_alternatives():
    with pytest.raises(ConfigError, match=r"'train.stepz'.*steps"):
        load_config(CONFIGS / "tiny.py", ["--config.train.stepz=3"])
    with pytest.raises(ConfigError, match="no section 'trian'"):
        load_config(CONFIGS / "tiny.py", ["--config.trian.steps=3"])


def test_wrong_type_and_bad_choice():
    with pytest.raises(ConfigError, match=r"train.steps.*expected int"):
        load_config(CONFIGS / "tiny.py", ["--config.train.steps=1.5"])
    allowed = r"model.attention.*allowed: \('causal', 'bidirectional'\)"
    with pytest.raises(ConfigError, match=allowed):
        load_config(CONFIGS / "tiny.py", ["--config.model.attention=sideways"])
    with pytest.raises(ConfigError, match=r"data.on_bad_record.*allowed"):
        load_config(CONFIGS / "tiny.py", ["--config.data.on_bad_record=ignore"])


def test_range_checks():
    c = default_config()
    c.loss.temperature = 0.0
    with pytest.raises(ConfigError, match=r"loss.temperature.*> 0"):
        validate(c)
    c = default_config()
    c.data.passage_max_len = 4096
    with pytest.raises(ConfigError, match="passage_max_len"):
        validate(c)
    c = default_config()
    for rungs in (0, 1, 8):
        c.model.attention_tile_rungs = rungs
        validate(c)
    c.model.attention_tile_rungs = 3
    with pytest.raises(ConfigError, match=r"attention_tile_rungs must be 0 or a power of two"):
        validate(c)
    c = default_config()
    for tokens in (-1, 0, 20_000):
        c.train.compile_cost_tokens = tokens
        validate(c)
    c.train.compile_cost_tokens = -2
    with pytest.raises(ConfigError, match=r"compile_cost_tokens must be -1 \(by platform\), 0"):
        validate(c)


def test_a_revision_needs_a_hub_id(tmp_path):
    c = default_config()
    c.model.revision = "v1"
    with pytest.raises(ConfigError, match=r"model.revision='v1' pins a .*Hub id.*''"):
        validate(c)
    c.model.hf_path = str(tmp_path)
    with pytest.raises(ConfigError, match="a local folder has no revisions"):
        validate(c)
    c.model.hf_path = "owner/model"
    validate(c)


def test_from_json_round_trip_and_older_files_get_new_keys():
    c = load_config(CONFIGS / "tiny.py", ["--config.train.mesh=(2,-1,1)"])
    again = from_json(to_json(c))
    assert again.to_dict() == c.to_dict() and isinstance(again.lora.targets, tuple)
    old = json.loads(to_json(c))
    del old["model"]["attention_impl"], old["train"]["grad_cache_chunks"]
    restored = from_json(json.dumps(old))
    assert restored.model.attention_impl == default_config().model.attention_impl
    assert restored.train.grad_cache_chunks == 1


def test_unknown_keys_suggest_the_closest():
    suggestion = r"'train.stepz'; did you mean 'steps'\? Keys here: .*mesh"
    with pytest.raises(ConfigError, match=suggestion):
        load_config(CONFIGS / "tiny.py", ["--config.train.stepz=3"])
    with pytest.raises(ConfigError, match="no section 'trian'; did you mean 'train'"):
        load_config(CONFIGS / "tiny.py", ["--config.trian.steps=3"])


class _Recording(dict):
    """A dict that remembers which keys were read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)


def test_model_arch_takes_exactly_the_fields_the_decoder_reads():
    arch = _Recording(default_config().model.arch.to_dict())
    ModelConfig.from_hf(arch)
    assert arch.read == set(HF_CONFIG_KEYS)
    # A typo is an error naming the key and the closest field, not a field silently ignored.
    with pytest.raises(
        ConfigError,
        match=r"'model.arch.num_hidden_layer'; did you mean 'num_hidden_layers'\?.*rope_theta",
    ):
        load_config(CONFIGS / "tiny.py", ["--config.model.arch.num_hidden_layer=2"])
    c = default_config()
    c.model.arch.torch_dtype = "bfloat16"  # an HF config.json field the decoder never reads
    with pytest.raises(ConfigError, match=r"'model\.arch\.torch_dtype'"):
        validate(c)
    # Fields it reads but the default lacks are welcome.
    assert load_config(CONFIGS / "tiny.py", ["--config.model.arch.attention_bias=True"])
