"""`smalto.load`: every format it reads (HF safetensors / .bin, a run folder, its checkpoints/, one step_* folder)
honours every override (max_seq_len, attn_impl, dtype, device, any config field) and returns the saved weights."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import smalto
from smalto.errors import CheckpointError, ConfigError, UserError
from smalto.generate import generate
from smalto.hf import save_pretrained
from smalto.model.config import MPTConfig
from smalto.model.mpt import MPTForCausalLM
from smalto.tokenizer import load_tokenizer
from tests import forkrun

REPO = Path(__file__).resolve().parents[1]
# ALiBi, so a raised max_seq_len runs past the trained length; the vocabulary fits the GPT-NeoX tokenizer
TINY = dict(
    d_model=32,
    n_heads=2,
    n_layers=2,
    vocab_size=50432,
    max_seq_len=16,
    no_bias=True,
    attn_config={"alibi": True, "attn_impl": "sdpa"},
)
FORMATS = ["hf_safetensors", "hf_bin", "run", "checkpoints", "step"]


def write_run(model: MPTForCausalLM, run: Path, tokenizer: Path) -> Path:
    """A training run folder as `smalto train` leaves it: config.yaml, checkpoints/latest, checkpoints/step_*."""
    from smalto.train.checkpoint import Checkpointer
    from smalto.train.parallel import World

    world = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = Checkpointer(run / "checkpoints", world).save(2, model, optimizer, {"step": 2})
    (run / "config.yaml").write_text(f"tokenizer: {tokenizer}\nrun_dir: {run}\n")
    return step


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, neox_tokenizer_dir: Path) -> tuple[MPTForCausalLM, dict]:
    """A tiny model and the same weights written in every format `smalto.load` reads."""
    torch.manual_seed(0)
    model = MPTForCausalLM(MPTConfig.from_dict(TINY)).eval()
    with torch.no_grad():  # peaky logits: greedy decoding has no near-ties to flip
        model.transformer.wte.weight.mul_(8)
    root = tmp_path_factory.mktemp("load")
    step = write_run(model, root / "run", neox_tokenizer_dir)
    paths = {
        "hf_safetensors": save_pretrained(model, root / "hf_st"),
        "hf_bin": save_pretrained(model, root / "hf_bin", safe_serialization=False),
        "run": root / "run",
        "checkpoints": root / "run" / "checkpoints",
        "step": step,
    }
    return model, paths


def test_every_format_is_found(saved: tuple[MPTForCausalLM, dict]) -> None:
    _, paths = saved
    assert (paths["hf_bin"] / "pytorch_model.bin").is_file() and (
        paths["hf_safetensors"] / "model.safetensors"
    ).is_file()
    assert paths["step"].name == "step_00000002" and (paths["checkpoints"] / "latest").is_file()


@pytest.mark.parametrize("fmt", FORMATS)
def test_loads_the_saved_weights_in_eval_mode(saved: tuple[MPTForCausalLM, dict], fmt: str) -> None:
    model, paths = saved
    loaded = smalto.load(paths[fmt])
    assert not loaded.training and loaded.config == model.config
    assert loaded.dtype == torch.float32 and loaded.device == torch.device("cpu")
    ref = model.state_dict()
    assert loaded.state_dict().keys() == ref.keys()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, ref[name]), name


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
        ),
    ],
)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_override_reaches_every_format(
    saved: tuple[MPTForCausalLM, dict], fmt: str, device: str
) -> None:
    model, paths = saved
    loaded = smalto.load(
        paths[fmt],
        dtype="bf16",
        device=device,
        max_seq_len=64,
        attn_impl="eager",
        attn_config={"clip_qkv": 8.0},
    )
    assert loaded.config.max_seq_len == 64
    assert loaded.config.attn_config.attn_impl == "eager" and loaded.config.attn_config.clip_qkv == 8.0
    assert loaded.config.attn_config.alibi  # the stored config is kept where not overridden
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert all(p.device.type == device for p in loaded.parameters())
    ref = model.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value.cpu(), ref[name].to(torch.bfloat16)), name
    # the legacy hub spelling maps as in config.json; a torch.dtype is accepted as well as a name
    assert (
        smalto.load(paths[fmt], attn_impl="torch", dtype=torch.float16).config.attn_config.attn_impl == "auto"
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_overrides_are_refused_naming_them(saved: tuple[MPTForCausalLM, dict], fmt: str) -> None:
    _, paths = saved
    with pytest.raises(ConfigError, match="max_seqlen"):
        smalto.load(paths[fmt], max_seqlen=64)
    with pytest.raises(ConfigError, match="clip_qvk"):
        smalto.load(paths[fmt], attn_config={"clip_qvk": 1.0})
    with pytest.raises(ConfigError, match="attn_impl = 'flash2' is not allowed"):
        smalto.load(paths[fmt], attn_impl="flash2")
    with pytest.raises(ConfigError, match="dtype 'int8' is not supported"):
        smalto.load(paths[fmt], dtype="int8")
    with pytest.raises(ConfigError, match="device 'banana' is not a device"):
        smalto.load(paths[fmt], device="banana")
    with pytest.raises(ConfigError, match=r"change the shape.*transformer\.blocks\.0"):
        smalto.load(paths[fmt], d_model=64)


def test_max_seq_len_of_learned_positions_is_refused(tmp_path: Path) -> None:
    spec = {**TINY, "vocab_size": 64, "learned_pos_emb": True, "attn_config": {"alibi": False}}
    folder = save_pretrained(MPTForCausalLM(MPTConfig.from_dict(spec)), tmp_path / "m")
    with pytest.raises(ConfigError, match=r"transformer\.wpe\.weight \(16, 32\) → \(64, 32\)"):
        smalto.load(folder, max_seq_len=64)
    assert smalto.load(folder, max_seq_len=16).config.max_seq_len == 16


def test_paths_that_are_no_model_are_refused(tmp_path: Path, saved: tuple[MPTForCausalLM, dict]) -> None:
    with pytest.raises(CheckpointError, match="does not exist; pass an HF model folder"):
        smalto.load(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is not a model folder smalto can read"):
        smalto.load(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is not a model folder"):
        smalto.load(tmp_path / "file.txt")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000009\n")  # names a deleted checkpoint
    with pytest.raises(CheckpointError, match="step_00000009 is not a complete smalto training checkpoint"):
        smalto.load(tmp_path / "run")


def test_smalto_load_is_the_function_after_submodule_imports() -> None:
    from smalto.load import find_tokenizer  # noqa: F401  (imports the submodule `smalto.load` again)

    assert callable(smalto.load) and smalto.load is sys.modules["smalto.load"].load
    assert smalto.save is smalto.hf.save_pretrained
    code = (
        "import sys\n"
        "from smalto.load import find_tokenizer\n"
        "import smalto, smalto.hf\n"
        "assert smalto.load is sys.modules['smalto.load'].load, smalto.load\n"
        "from smalto import save\n"
        "assert save is smalto.hf.save_pretrained\n"
    )
    r = forkrun.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    r = forkrun.run(
        [sys.executable, "-c", "import sys, smalto; assert 'torch' not in sys.modules"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr  # `import smalto` stays light


def test_generate_run_folder_past_its_trained_length(
    saved: tuple[MPTForCausalLM, dict], neox_tokenizer_dir: Path
) -> None:
    """`--max-seq-len` reaches a training checkpoint: an ALiBi model trained for 16 positions generates 32 tokens."""
    _, paths = saved
    tok = load_tokenizer(neox_tokenizer_dir)
    with pytest.raises(UserError, match=r"exceeds max_seq_len \(16\)"):  # what generate says without it
        generate(smalto.load(paths["run"]), tok, ["Hello world"], max_new_tokens=30, temperature=0)
    (ref,) = generate(
        smalto.load(paths["run"], max_seq_len=64), tok, ["Hello world"], max_new_tokens=30, temperature=0
    )
    assert len(ref.token_ids) == 30
    args = ["generate", str(paths["run"]), "-p", "Hello world", "-n", "30", "--temperature", "0"]
    args += ["--device", "cpu", "--tokenizer", str(neox_tokenizer_dir), "--max-seq-len", "64"]
    r = forkrun.run(
        [sys.executable, "-m", "smalto", *args], capture_output=True, text=True, cwd=REPO, timeout=180
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == ref.text + "\n"
