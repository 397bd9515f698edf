"""Scale-out the ecosystem's way: examples/finetune.py under the shipped accelerate configs (FSDP2 and DDP on 2 CPU
ranks): world size 2, sharded parameters, sharded checkpoints that resume, and a saved model that reloads (with the
package and with trust_remote_code) to the logits of the fine-tuned model in memory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BLOCK_PACKAGE, HANG_TIMEOUT
from test_finetune import LAUNCH_ENV, ROOT, assets, tiny_args  # noqa: F401  (assets: the tiny model and data fixture)
from transformers import AutoModelForCausalLM

CONFIGS = ROOT / "examples" / "accelerate_configs"


def launch_command(config: str, args: list[str], port: int) -> list[str]:
    """`accelerate launch --config_file examples/accelerate_configs/<config> examples/finetune.py ARGS`."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
            "--main_process_port", str(port), str(ROOT / "examples" / "finetune.py"), *args]


def launch(config: str, args: list[str], port: int) -> dict:
    """Run launch_command, which must succeed; its results.json."""
    result = subprocess.run(launch_command(config, args, port), capture_output=True, text=True, timeout=HANG_TIMEOUT,
                            env=LAUNCH_ENV)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((Path(args[args.index("--output_dir") + 1]) / "results.json").read_text())


REMOTE_LOGITS = BLOCK_PACKAGE + """
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert "hf_merged_attn" not in sys.modules
with torch.no_grad():
    print(json.dumps(model(torch.tensor(json.loads(sys.argv[2])))[0].tolist()))
"""


def test_fsdp_config_shards_and_saves_a_model_that_reloads_exactly(assets, tmp_path):
    out = tmp_path / "fsdp"
    args = tiny_args(assets, out, "--modes", "latent:32", "--checkpointing_steps", "2")
    saved = launch("fsdp.yaml", args, 29531)
    assert saved["world_size"] == 2 and saved["distributed_type"] == "DistributedType.FSDP"  # not DDP in disguise
    assert saved["fsdp_wrapped_blocks"] == ["GPT2Block"]  # the registry's block class (the config names none)
    run = saved["runs"][0]
    held, total = run["parameters_held_per_rank"], run["total_params"]
    # FSDP2 cuts every parameter along its first dimension: each rank holds about half, together exactly all
    assert len(held) == 2 and sum(held) == total and max(held) < 0.6 * total
    assert len(set(run["first_batch_hash_per_rank"])) == 2  # the ranks train on different batches
    assert run["perplexity_after"] != run["perplexity_at_patch"]  # it trained
    # finetune.py compared the saved model, loaded back with the package, to the fine-tuned one in memory (sharded,
    # its forward gathering the shards): fp32 weights gathered bit for bit, so the logits agree to fp32 round-off
    assert run["reload_max_abs_diff"] is not None and run["reload_max_abs_diff"] <= 1e-5

    folder = Path(run["saved_to"])
    assert not list(folder.glob("_fsdp*.py")) and not list(folder.glob("*.bin"))  # no torch sources, no pickles
    ids = torch.tensor([[5, 17, 42, 8, 99, 3, 250, 7]])
    with torch.no_grad():
        package = AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits
    remote = subprocess.run([sys.executable, "-c", REMOTE_LOGITS, str(folder), json.dumps(ids.tolist())],
                            capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert remote.returncode == 0, remote.stderr[-3000:]
    # the same weights through the same code (the remote copy is the package's own source): identical
    assert torch.equal(torch.tensor(json.loads(remote.stdout.strip().splitlines()[-1])), package)

    # the sharded checkpoints (each rank's shards in sub-folders, all in the manifest) resume: drop the last one,
    # rerun, and reach the same result from step 2
    run_dir = folder.parent
    assert (run_dir / "step_2" / "manifest.json").is_file() and (run_dir / "step_4" / "manifest.json").is_file()
    listed = json.loads((run_dir / "step_2" / "manifest.json").read_text())["sha256"]
    # torch.distributed.checkpoint writes one __<rank>_0.distcp file per rank for the model (and the optimizer)
    model_shards = {name.rsplit("/", 1)[-1] for name in listed if name.startswith("pytorch_model_fsdp_0/")}
    assert {"__0_0.distcp", "__1_0.distcp"} <= model_shards, listed
    shutil.rmtree(run_dir / "step_4")
    resumed = launch("fsdp.yaml", [*args, "--resume_from_checkpoint", "latest"], 29532)["runs"][0]
    assert resumed["resumed_from"].endswith("step_2")
    # the same shards, optimizer state, RNG and data position: the same float ops (gloo reductions are ordered)
    assert resumed["perplexity_after"] == pytest.approx(run["perplexity_after"], rel=1e-6)
    assert resumed["final_train_loss"] == pytest.approx(run["final_train_loss"], rel=1e-6)


def test_ddp_config_runs_two_cpu_ranks(assets, tmp_path):
    saved = launch("ddp_cpu.yaml", tiny_args(assets, tmp_path / "ddp", "--modes", "covariance",
                                             "--max_train_steps", "2"), 29533)
    assert saved["world_size"] == 2 and saved["distributed_type"] == "DistributedType.MULTI_CPU"
    run = saved["runs"][0]
    assert run["parameters_held_per_rank"] == [run["total_params"]] * 2  # DDP: every rank holds the whole model
    assert run["reload_max_abs_diff"] == 0.0  # unsharded: the saved weights are the ones in memory


def test_shipped_configs_name_what_they_promise():
    """The configs are accelerate's own format with the settings the README describes."""
    import yaml

    fsdp = yaml.safe_load((CONFIGS / "fsdp.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP" and fsdp["num_processes"] == 2
    assert fsdp["fsdp_config"]["fsdp_version"] == 2
    assert fsdp["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_config"]["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"  # checkpoints stay sharded
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp["fsdp_config"]  # taken from the registry
    zero3 = yaml.safe_load((CONFIGS / "deepspeed_zero3.yaml").read_text())
    assert zero3["distributed_type"] == "DEEPSPEED" and zero3["deepspeed_config"]["zero_stage"] == 3
    assert zero3["deepspeed_config"]["zero3_init_flag"] is False  # seeding needs the whole pretrained weights
    assert zero3["deepspeed_config"]["zero3_save_16bit_model"] is True


def test_push_to_hub_is_refused_when_sharded(assets, tmp_path):
    """push_to_hub on a sharded model would upload one rank's shards: refused before any work, with what to do."""
    args = tiny_args(assets, tmp_path / "push", "--modes", "covariance", "--push_to_hub", "--hub_model_id", "me/x")
    result = subprocess.run(launch_command("fsdp.yaml", args, 29534), capture_output=True, text=True, timeout=HANG_TIMEOUT,
                            env=LAUNCH_ENV)
    assert result.returncode != 0
    assert "--push_to_hub with FSDP" in result.stderr and "push that folder" in result.stderr
    assert not (tmp_path / "push" / "covariance-seed0").exists()  # nothing trained
