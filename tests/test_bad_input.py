"""Every bad input of a run: one `error:` line saying what is wrong and how to fix it, a
non-zero exit, and every file already written (an earlier run's folder) left as it was."""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import small_cfg
from safetensors import SafetensorError

import cache as activation_cache
import checkpoint
import main
import training
from checkpoint import verify_checkpoint
from config import get_default_cfg

TINY = {"batch_size": 64, "num_batches_in_buffer": 4, "eval_tokens": 256, "downstream_eval_rows": 4,
        "num_tokens": 64 * 8, "checkpoint_freq": 4, "eval_freq": 8}


def cli(**overrides) -> list[str]:
    """key=value arguments for small_cfg | TINY | overrides, where they differ from the defaults."""
    cfg, defaults = small_cfg(**TINY | overrides), get_default_cfg()
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in cfg.items()
            if v != defaults[k]]


@pytest.fixture(scope="module")
def earlier_runs(minilm, tmp_path_factory) -> Path:
    """An output folder of two finished runs, trained apart: `prev` (batchtopk), `other` (topk)."""
    out = tmp_path_factory.mktemp("earlier")
    for sae_type, name in (("batchtopk", "prev"), ("topk", "other")):
        training.train_sae(small_cfg(**TINY | {"sae_type": sae_type, "run_name": name,
                                               "output_dir": str(out)}), model=minilm)
    return out


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class WithoutResidMid:
    """The embedded model, as if it had no resid_mid hook points."""

    def __init__(self, model):
        self._model = model
        self.hook_dict = {k: v for k, v in model.hook_dict.items() if "hook_resid_mid" not in k}

    def __getattr__(self, name):
        return getattr(self._model, name)


def setup_foreign_checkpoint(runs: Path) -> None:
    """prev killed after step 4, with topk's step-4 checkpoint copied in as its step 6."""
    shutil.rmtree(runs / "prev" / "final")
    shutil.copytree(runs / "other" / "checkpoints" / "step_0000004",
                    runs / "prev" / "checkpoints" / "step_0000006")


def write_corpora(folder: Path) -> None:
    (folder / "empty.jsonl").write_text("")
    (folder / "blank.txt").write_text("   \n\n \t \n\n  \n")
    (folder / "body.jsonl").write_text('{"body": "Some text in the wrong column."}\n' * 50)
    (folder / "a_file").write_text("not a folder")


def disk_full_when(module, writing: Callable[[Path], bool], monkeypatch) -> None:
    """`module.save_file` fails where `writing(path)` holds, as safetensors fails on a full disk
    (its error is not an OSError), after writing part of the file."""
    real = module.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if writing(Path(filename)):
            Path(filename).write_bytes(b"partial")
            raise SafetensorError("Error while serializing: I/O error: No space left on device "
                                  "(os error 28)")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(module, "save_file", save_file)


# (id, argv from (runs folder, corpora folder), setup, exit code, the error line)
CASES = [
    ("misspelt key", lambda r, d: [*cli(output_dir=r), "dict_sise=512"], None, 2,
     r"unknown config key 'dict_sise': did you mean 'dict_size'\?"),
    ("wrong type", lambda r, d: [*cli(output_dir=r), "dict_size=big"], None, 2,
     r"config dict_size='big' is invalid: expected int"),
    ("impossible value", lambda r, d: [*cli(output_dir=r), "top_k=4000"], None, 2,
     r"config top_k=4000 is invalid: must be <= dict_size \(256\)"),
    ("negative lr", lambda r, d: [*cli(output_dir=r), "lr=-0.1"], None, 2,
     r"config lr=-0.1 is invalid: must be >= 0"),
    ("matryoshka groups short of dict_size",
     lambda r, d: [*cli(output_dir=r), "sae_type=matryoshka", "matryoshka_groups=64,64"], None, 2,
     r"config matryoshka_groups='64,64' is invalid: non-empty groups adding up to "
     r"dict_size \(256\)"),
    ("target_l0 where k sets the L0",
     lambda r, d: [*cli(output_dir=r), "sae_type=topk", "target_l0=16"], None, 2,
     r"config target_l0=16.0 is invalid: sae_type=topk has no sparsity coefficient to adapt"),
    ("target_l0 above dict_size",
     lambda r, d: [*cli(output_dir=r), "sae_type=vanilla", "target_l0=300"], None, 2,
     r"config target_l0=300.0 is invalid: must be <= dict_size \(256\)"),
    ("matryoshka empty group",
     lambda r, d: [*cli(output_dir=r), "sae_type=matryoshka", "matryoshka_groups=128,0,128"],
     None, 2, r"config matryoshka_groups='128,0,128' is invalid: "
     r"non-empty groups adding up to dict_size \(256\)"),
    ("model path", lambda r, d: [*cli(output_dir=r), "model_name=/nonexistent/model"],
     "real model", 2, r"config model_name='/nonexistent/model' could not be loaded "
     r"\(a Hub name needs internet, or a local folder"),
    ("hub model offline", lambda r, d: [*cli(output_dir=r), "model_name=nobody-here/no-such-model"],
     "real model", 2, r"config model_name='nobody-here/no-such-model' could not be loaded "
     r"\(a Hub name needs internet"),
    ("hook point", lambda r, d: [*cli(output_dir=r), "site=resid_mid"], "no resid_mid", 2,
     r"hook point 'blocks\.3\.hook_resid_mid' does not exist in this model: valid sites are "
     r"resid_pre, resid_post"),
    ("unknown hook name", lambda r, d: [*cli(output_dir=r), "hook_point=blocks.3.mlp.hook_inn"],
     None, 2, r"hook point 'blocks\.3\.mlp\.hook_inn' does not exist in this model: "
     r".*closest hook names: blocks\.3\.mlp\.hook_in"),
    ("transcoder target before input",
     lambda r, d: [*cli(output_dir=r), "site=mlp_out", "target_site=mlp_in"], None, 2,
     r"config target hook point 'blocks\.3\.mlp\.hook_in' comes before the input "
     r"'blocks\.3\.hook_mlp_out'"),
    ("clt layers outside the model",
     lambda r, d: [*cli(output_dir=r), "cross_layer=true", "layers=2:6"], None, 2,
     r"config layers='2:6' is outside the model's layers 0\.\.5"),
    ("clt target before input",  # MiniLM's resid_mid comes after its mlp_out (a post-LN block)
     lambda r, d: [*cli(output_dir=r), "cross_layer=true", "site=resid_mid"], None, 2,
     r"config target hook point 'blocks\.0\.hook_mlp_out' comes before the input "
     r"'blocks\.0\.hook_resid_mid'"),
    ("clt variant", lambda r, d: [*cli(output_dir=r), "cross_layer=true", "sae_type=vanilla"],
     None, 2, r"config sae_type=vanilla cannot be a cross-layer transcoder"),
    ("clt layers without cross_layer", lambda r, d: [*cli(output_dir=r), "layers=0:2"], None, 2,
     r"config layers='0:2' is invalid: is for cross_layer=true"),
    ("skip connection without target", lambda r, d: [*cli(output_dir=r), "skip_connection=true"],
     None, 2, r"config skip_connection=True is invalid: needs a target "
     r"\(target_site or target_hook_point\)"),
    ("hook point of another width",
     lambda r, d: [*cli(output_dir=r), "hook_point=blocks.3.mlp.hook_pre"], None, 2,
     r"hook point 'blocks\.3\.mlp\.hook_pre' gives activations of shape \(8, 32, 1536\): this "
     r"project trains on \(batch, position, d_model=384\) hook points"),
    ("dataset path", lambda r, d: [*cli(output_dir=r), f"dataset_path={d}/missing.txt"], None, 2,
     r"config dataset_path='.*missing\.txt' does not exist"),
    ("empty corpus", lambda r, d: [*cli(output_dir=r), f"dataset_path={d}/empty.jsonl"], None, 2,
     r"config dataset_path='.*empty\.jsonl' is empty: it holds no text"),
    ("blank corpus", lambda r, d: [*cli(output_dir=r), f"dataset_path={d}/blank.txt"], None, 2,
     r"config dataset_path='.*blank\.txt' gives only 0 rows of seq_len=32; need more than the 9 "
     r"held-out rows"),
    ("text column", lambda r, d: [*cli(output_dir=r), f"dataset_path={d}/body.jsonl"], None, 2,
     r"config text_column='text' is not in the dataset; its columns are body"),
    ("run folder exists", lambda r, d: cli(output_dir=r, run_name="prev"), None, 2,
     r"the run folder .*prev already exists; continue it with --resume .*, replace it with "
     r"overwrite=true"),
    ("unwritable output", lambda r, d: cli(output_dir=f"{d}/a_file/runs"), None, 2,
     r"config output_dir='.*a_file/runs' is not writable \(Not a directory\); choose another "
     r"output_dir"),
    ("resume other variant", lambda r, d: ["--resume", f"{r}/prev", "sae_type=topk"], None, 2,
     r"config sae_type='topk' differs from 'batchtopk' in the run being resumed "
     r".*only wandb_mode, "),
    ("resume other dict_size", lambda r, d: ["--resume", f"{r}/prev", "dict_size=512"], None, 2,
     r"config dict_size=512 differs from 256 in the run being resumed"),
    ("resume foreign checkpoint", lambda r, d: ["--resume", f"{r}/prev"], "foreign checkpoint", 2,
     r"checkpoint .*prev/checkpoints/step_0000006 is from another run: its sae_type is 'topk', "
     r"this run's is 'batchtopk'"),
    ("resume not a run", lambda r, d: ["--resume", str(d)], None, 2,
     r"config resume='.*' is not a run folder: .*config\.json cannot be read"),
    ("disk full", lambda r, d: cli(output_dir=r, run_name="full", checkpoint_freq=2), "disk full",
     4, r"disk full \(.*No space left on device.*\) while writing checkpoint "
     r".*full/checkpoints/step_0000004; earlier checkpoints are intact: free space, then continue "
     r"with python main.py --resume .*full"),
    ("cache disk full", lambda r, d: cli(output_dir=r, run_name="cached", cache_dir=f"{d}/cache"),
     "cache disk full", 4,
     r"disk full \(.*No space left on device.*\) while writing the activation cache .*; the "
     r"shards it lists are intact, and runs read them and generate the rest: free space or "
     r"choose another cache_dir"),
]


@pytest.mark.parametrize("argv,setup,code,message", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_damages_nothing(argv, setup, code, message, earlier_runs,
                                                      minilm, tmp_path, monkeypatch, capsys):
    runs, data = tmp_path / "runs", tmp_path / "data"
    shutil.copytree(earlier_runs, runs)
    data.mkdir()
    write_corpora(data)
    if setup == "real model":  # offline as this machine is, without waiting for network timeouts
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    else:
        model = WithoutResidMid(minilm) if setup == "no resid_mid" else minilm
        monkeypatch.setattr(training, "load_model", lambda *args: model)
    if setup == "foreign checkpoint":
        setup_foreign_checkpoint(runs)
    if setup == "disk full":
        disk_full_when(checkpoint, lambda path: path.parent.name == ".tmp-step_0000004",
                       monkeypatch)
    if setup == "cache disk full":
        disk_full_when(activation_cache, lambda path: path.name.startswith(".tmp-shard"),
                       monkeypatch)
    before = snapshot(runs)
    capsys.readouterr()

    assert main.main(argv(str(runs), str(data))) == code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert re.search(message, errors[0]), errors[0]
    after = snapshot(runs)
    assert {k: after.get(k) for k in before} == before  # nothing already written changed
    if setup == "disk full":
        checkpoints = runs / "full" / "checkpoints"
        assert sorted(p.name for p in checkpoints.iterdir()) == ["step_0000002"]  # no .tmp left
        assert verify_checkpoint(checkpoints / "step_0000002") is None
    if setup == "cache disk full":
        cache = next((data / "cache").iterdir())
        assert sorted(p.name for p in cache.iterdir()) == ["eval.safetensors",
                                                           "manifest.json"]  # no .tmp left


def test_overwrite_replaces_a_run_folder_but_never_a_foreign_one(earlier_runs, minilm, tmp_path,
                                                                 monkeypatch):
    from config import ConfigError
    from logs import RunLogger

    runs = tmp_path / "runs"
    shutil.copytree(earlier_runs, runs)
    (runs / "prev" / "metrics.jsonl").write_text('{"step": 999, "tokens": 0}\n')
    monkeypatch.setattr(training, "load_model", lambda *args: minilm)
    assert main.main(cli(output_dir=str(runs), run_name="prev", overwrite=True)) == 0
    assert '"step": 999' not in (runs / "prev" / "metrics.jsonl").read_text()
    assert verify_checkpoint(runs / "prev" / "checkpoints" / "step_0000004") is None

    (runs / "notes").mkdir()
    (runs / "notes" / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="is not a run folder .*refusing to delete it"):
        RunLogger(small_cfg(output_dir=str(runs), run_name="notes", overwrite=True))
    assert (runs / "notes" / "thesis.tex").read_text() == "precious"
