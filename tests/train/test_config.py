"""Recipes: every shipped one loads with its published shape; bad keys/values are refused by name, also via the CLI."""

from __future__ import annotations

import sys

import pytest

from smalto.config import apply_overrides, load_config, recipe_names
from smalto.errors import ConfigError
from tests import forkrun
from tests.train.conftest import REPO

PUBLISHED = {  # d_model, n_heads, n_layers, max_seq_len (mosaicml/mpt-* config.json, llm-foundry yamls)
    "mpt-125m": (768, 12, 12, 2048),
    "mpt-350m": (1024, 16, 24, 2048),
    "mpt-760m": (1536, 12, 24, 2048),
    "mpt-1b": (2048, 16, 24, 2048),
    "mpt-3b": (2560, 20, 32, 2048),
    "mpt-7b": (4096, 32, 32, 2048),
    "mpt-30b": (7168, 64, 48, 8192),
}


def test_shipped_recipes_have_published_shapes():
    assert set(PUBLISHED) | {"tiny"} <= set(recipe_names())
    for name, (d, h, L, seq) in PUBLISHED.items():
        c = load_config(name)
        m = c.model
        assert (m.d_model, m.n_heads, m.n_layers, m.max_seq_len) == (d, h, L, seq), name
        assert (
            m.vocab_size == 50432
            and m.attn_config.alibi
            and m.no_bias
            and m.norm_type == "low_precision_layernorm"
        )
        assert c.optimizer.name == "lion" and c.data.seq_len == seq


def test_repo_configs_folder_is_the_shipped_one():
    assert load_config(str(REPO / "configs" / "tiny.yaml")).to_dict() == load_config("tiny").to_dict()


def test_overrides_are_yaml_typed():
    d = apply_overrides(
        {"train": {"global_batch_size": 8}},
        [
            "train.global_batch_size=32",
            "optimizer.lr=1e-3",
            "train.grad_clip=null",
            "train.sample_prompts=[a, b]",
            "model.attn_config.alibi=true",
            "name=x",
        ],
    )
    assert d["train"] == {"global_batch_size": 32, "grad_clip": None, "sample_prompts": ["a", "b"]}
    assert d["optimizer"]["lr"] == 1e-3 and d["model"]["attn_config"]["alibi"] is True and d["name"] == "x"
    c = load_config("tiny", ["optimizer.lr=1e-3", "run_dir=/tmp/x"])
    assert (
        c.optimizer.lr == 1e-3
        and c.data.sources[0].path == "/tmp/x/data"
        and c.tokenizer == "/tmp/x/tokenizer"
    )


@pytest.mark.parametrize(
    "override, message",
    [
        (["train.max_steps=3"], "unknown key train.max_steps; allowed keys: max_duration"),
        (["optimiser.lr=1"], "unknown key optimiser; allowed keys: name"),
        (["optimizer.name=sgd"], "optimizer.name = 'sgd' is not allowed; choose one of: lion, adamw"),
        (["model.d_model=130"], "d_model (130) must be divisible by n_heads (4)"),
        (
            ["train.global_batch_size=many"],
            "train.global_batch_size = 'many' has the wrong type; expected int",
        ),
        (["train.grad_clip=true"], "train.grad_clip = True has the wrong type"),
        (["model.attn_config.alibi_max=3"], "unknown key model.attn_config.alibi_max"),
        (["data.seq_len=512"], "data.seq_len (512) is longer than model.max_seq_len (256)"),
        (["train.max_duration=10 epochs"], "not a duration"),
        (["train.global_batch_size=10", "train.micro_batch_size=4"], "multiple of train.micro_batch_size"),
        (["scheduler.name=step"], "choose one of: cosine, linear, constant, inverse_sqrt"),
        (
            ["train.grad_sync=never"],
            "train.grad_sync = 'never' is not allowed; choose one of: micro_batch, step",
        ),
        (
            ["train.weight_cast=once"],
            "train.weight_cast = 'once' is not allowed; choose one of: step, micro_batch",
        ),
        (["guard.spike=ignore"], "guard.spike = 'ignore'"),
        (["data.shufle=false"], "unknown key data.shufle"),
        (["train.activation_checkpointing=0"], "use true, false, a positive integer k (every k-th block)"),
        (
            ["train.activation_checkpointing=attention"],
            "train.activation_checkpointing = 'attention': use true, false, a positive integer k (every k-th"
            " block) or selective (every block, keeping attention's outputs)",
        ),
        # every section and the top level: one type check against the field's annotation, the key named
        (["data.seq_len=abc"], "data.seq_len = 'abc' has the wrong type; expected int"),
        (["data.num_workers=two"], "data.num_workers = 'two' has the wrong type; expected int"),
        (
            ["data.sources=[{path: x, proportion: abc}]"],
            "data.sources[0].proportion = 'abc' has the wrong type; expected float or null",
        ),
        (["data.sources=[{split: train}]"], "data.sources[0] needs path"),
        (["seed=abc"], "seed = 'abc' has the wrong type; expected int"),
        (["seed=1.7"], "seed = 1.7 has the wrong type; expected int"),
        (["data.seed=1.7"], "data.seed = 1.7 has the wrong type; expected int"),
        (["name=[a]"], "name = ['a'] has the wrong type; expected str"),
        (["data=5"], "data must be a mapping, got 5"),
        (["model=5"], "model must be a mapping, got 5"),
        (["model.attn_config=3"], "model.attn_config = 3 has the wrong type; expected a mapping"),
        (["model.d_model=abc"], "model.d_model = 'abc' has the wrong type; expected int"),
        (
            ["model.attn_config.alibi=maybe"],
            "model.attn_config.alibi = 'maybe' has the wrong type; expected bool",
        ),
        (["train.sample_prompts=[1]"], "train.sample_prompts[0] = 1 has the wrong type; expected str"),
        (
            ["run_dir=runs/{nope}"],
            "run_dir = 'runs/{nope}' has an unknown placeholder {nope}; allowed: {name}",
        ),
        (["checkpoint.folder='{rundir}/ck'"], "checkpoint.folder = '{rundir}/ck' has an unknown placeholder"),
        (
            ["data.sources=[{path: '{name}/d'}]"],
            "data.sources[0].path = '{name}/d' has an unknown placeholder",
        ),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", override)
    assert message in str(e.value)


def test_integral_floats_are_ints_and_the_rest_keep_their_type():
    c = load_config("tiny", ["data.epoch_size=1e3", "seed=5", "optimizer.lr=1", "train.max_duration=1e2"])
    assert c.data.epoch_size == 1000 and isinstance(c.data.epoch_size, int) and c.seed == c.data.seed == 5
    assert c.optimizer.lr == 1 and c.train.max_duration == 100


def test_a_recipe_that_is_not_a_mapping_is_refused(tmp_path):
    recipe = tmp_path / "list.yaml"
    recipe.write_text("- name: x\n- data: {}\n")
    with pytest.raises(ConfigError, match=r"list.yaml: a recipe must be a mapping of sections, got a list"):
        load_config(str(recipe))


def test_an_index_shard_that_is_not_a_mapping_is_refused():
    from smalto.data.mds import parse_index
    from smalto.errors import DataError

    with pytest.raises(DataError, match=r"index.json: shard 0 is 'shard.00000.mds', not a mapping"):
        parse_index(
            '{"version": 2, "shards": ["shard.00000.mds"]}',
            "index.json",
        )


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match=r"no recipe 'mpt-9b'.*mpt-7b"):
        load_config("mpt-9b")


@pytest.mark.parametrize(
    "args, message",
    [
        (["tiny", "train.lr=3"], "unknown key train.lr"),
        (["tiny", "optimizer.lr=-1"], "optimizer.lr = -1 must be positive"),
        (["tiny", "seed=1.7"], "seed = 1.7 has the wrong type; expected int"),
        (["tiny", "data.num_workers=two"], "data.num_workers = 'two' has the wrong type; expected int"),
        (["tiny", "run_dir=runs/{nope}"], "run_dir = 'runs/{nope}' has an unknown placeholder {nope}"),
        (["no-such-recipe"], "no recipe 'no-such-recipe'"),
    ],
)
def test_cli_refuses_bad_recipes_with_exit_2(args, message):
    p = forkrun.run(
        [sys.executable, "-m", "smalto", "train", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    assert message in " ".join(p.stderr.split()) and "Traceback" not in p.stderr  # rich wraps long lines
