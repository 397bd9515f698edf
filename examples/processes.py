"""Processes and devices for the fine-tuning examples: the Accelerator of a launch (DDP, FSDP2 on CPU ranks too), what
each rank holds, and the peak memory of a run."""

from __future__ import annotations

import os
import threading

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


def on_cpu_ranks() -> bool:
    """Several launched processes and no accelerator device: accelerate 1.15 only picks MULTI_CPU (gloo) when told
    cpu=True; otherwise each launched process would silently train alone (world size 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()


def make_accelerator(args, spec) -> Accelerator:
    """This launch's Accelerator: DDP over gloo or FSDP2 on CPU ranks too; FSDP wraps the family's block (registry)."""
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, cpu=on_cpu_ranks())
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and \
            accelerator.distributed_type == DistributedType.MULTI_CPU:
        # accelerate 1.15 selects FSDP on accelerator devices only (AcceleratorState): on CPU ranks an FSDP config
        # silently runs DDP, every rank holding the whole model. torch's FSDP2 (fully_shard) shards over gloo on CPU,
        # so take the FSDP the config asked for: its plugin from the launch environment, and the distributed type
        # on both shared states (AcceleratorState copies PartialState's whenever it is constructed again).
        plugin = FullyShardedDataParallelPlugin()
        if plugin.fsdp_version != 2:
            raise ValueError(
                f"the accelerate config asks for FSDP version {plugin.fsdp_version} on CPU processes; FSDP on CPU "
                "needs version 2 (torch's fully_shard). Set fsdp_version: 2 in its fsdp_config, as "
                "examples/accelerate_configs/fsdp.yaml does."
            )
        if accelerator.mixed_precision != "no":  # as accelerate's own FSDP set-up does
            plugin.set_mixed_precision(accelerator.mixed_precision)
        PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        if not plugin.transformer_cls_names_to_wrap:
            # the config names no block: wrap the family's, from the registry (accelerate would fall back to the
            # model's _no_split_modules, which a custom or remote-code class may not declare)
            plugin.transformer_cls_names_to_wrap = [spec.block_class.__name__]
    if args.push_to_hub and is_sharded(accelerator):
        raise ValueError(
            f"--push_to_hub with {accelerator.distributed_type.value}: the model in memory is sharded across the "
            "processes, and push_to_hub would upload one process's shards. Run without --push_to_hub; the first "
            "seed's model is saved whole (gathered) under --output_dir/<mode>-seed<N>/model: push that folder "
            "(AutoModelForCausalLM.from_pretrained(folder).push_to_hub(repo), or `hf upload repo folder`)."
        )
    return accelerator


def is_sharded(accelerator) -> bool:
    """True when every rank holds only a shard of the model (FSDP, ZeRO-3): then every rank joins each forward pass."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return accelerator.distributed_type == DistributedType.FSDP


def local_parameter_count(model) -> int:
    """Parameters this process holds: its shards only, under FSDP (DTensor) or ZeRO-3 (ds_tensor partitions)."""
    def held(p):
        if hasattr(p, "ds_tensor"):
            return p.ds_tensor.numel()
        return (p.to_local() if hasattr(p, "to_local") else p).numel()
    return sum(held(p) for p in model.parameters())


class PeakMemory:
    """Peak memory while the block runs: CUDA max allocated, or the process's resident set sampled every 10 ms."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb, self._stop = device, 0.0, threading.Event()

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _sample(self):
        while not self._stop.wait(0.01):
            self.peak_mb = max(self.peak_mb, self._rss_mb())

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif os.path.exists("/proc/self/statm"):
            self.peak_mb = self._rss_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
