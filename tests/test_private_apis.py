"""Every private library API the project depends on still exists with the shape the code assumes.

Where no public hook exists, the code patches or reads a library internal (README "Private APIs", with the versions
they were checked against). These tests fail loudly on an upgrade that moves one, instead of letting the code
silently degrade (e.g. ranks of one sequence disagreeing on RoPE factors, or a resumed run retraining batches).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect

import pytest
import torch


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_the_trainer_methods_we_override_keep_their_signatures_and_callers():
    from transformers import Trainer

    run_epoch = _parameters(Trainer._run_epoch)
    assert {"train_dataloader", "epoch"} <= set(run_epoch)
    # LongContextTrainer._run_epoch swaps this module attribute for one call, so _run_epoch must look it up there.
    import transformers.trainer as trainer_module

    assert callable(trainer_module.skip_first_batches)
    assert "skip_first_batches(" in inspect.getsource(Trainer._run_epoch)
    assert "set_epoch" in inspect.getsource(Trainer._run_epoch)
    assert _parameters(Trainer._save)[:3] == ["self", "output_dir", "state_dict"]
    assert _parameters(Trainer._load_from_checkpoint)[:3] == ["self", "resume_from_checkpoint", "model"]
    assert "self._load_from_checkpoint(" in inspect.getsource(Trainer)
    # compute_loss tells the Trainer whether its loss is already scaled for gradient accumulation.
    assert hasattr(Trainer, "loss_is_scaled_for_ga")
    assert "self.loss_is_scaled_for_ga" in inspect.getsource(Trainer)


def test_the_ulysses_data_loader_adapter_keeps_the_attributes_a_resume_uses():
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

    loader = torch.utils.data.DataLoader(list(range(4)), batch_size=2)
    adapter = UlyssesSPDataLoaderAdapter(loader, sp_rank=0, sp_group=None, sp_world_size=1, device="cpu")
    for name in ("dl", "micro_batches", "iter", "sp_rank", "sp_group", "sp_world_size", "device"):
        assert hasattr(adapter, name), name
    assert hasattr(adapter.micro_batches, "clear")


def test_the_sequence_parallel_group_getter_exists():
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    assert callable(parallel_state_sp.get_sequence_parallel_group)
    with pytest.raises(AssertionError):  # not a silent None before the group exists
        parallel_state_sp.get_sequence_parallel_group()


def test_the_process_group_caches_shutdown_clears_exist():
    from longrope import distributed

    for module_name in distributed._LIBRARY_GROUP_CACHES:
        importlib.import_module(module_name)  # a moved module would otherwise be skipped silently
    import accelerate.state
    import deepspeed.runtime.zero.parameter_offload as zero_offload
    import transformers.modeling_utils as modeling_utils

    assert isinstance(modeling_utils.ALL_ATTENTION_FUNCTIONS._local_mapping, dict)
    assert isinstance(zero_offload.FWD_MODULE_STACK, list)
    assert "reset_partial_state" in _parameters(accelerate.state.AcceleratorState._reset_state)


def test_the_zero3_switch_and_deepspeed_helpers_exist():
    from deepspeed.runtime.activation_checkpointing import offload_activations
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP
    from transformers.integrations import deepspeed as hf_deepspeed

    assert callable(hf_deepspeed.set_hf_deepspeed_config) and callable(hf_deepspeed.unset_hf_deepspeed_config)
    assert callable(offload_activations.get_checkpoint_hidden_states_offloading_ctx_manager)
    assert hasattr(TiledMLP, "apply")
    from transformers import TrainingArguments

    assert "hf_deepspeed_config" in inspect.getsource(TrainingArguments)


def test_deepspeed_builds_its_shared_memory_all_reduce_only_when_the_probed_op_table_allows_it(monkeypatch):
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    from longrope import distributed

    # the module, not the attribute: deepspeed.comm's "torch" attribute is torch itself
    deepspeed_torch_comm = importlib.import_module("deepspeed.comm.torch")
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    assert builder.NAME == distributed.DEEPSPEED_INFERENCE_ALL_REDUCE_OP
    assert distributed.DEEPSPEED_INFERENCE_ALL_REDUCE_OP in deepspeed.ops.__compatible_ops__
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, builder.NAME, deepspeed.ops.__compatible_ops__[builder.NAME])

    def no_compiling(self, *args, **kwargs):
        raise AssertionError("the shared-memory all-reduce op was compiled")

    monkeypatch.setattr(type(builder), "load", no_compiling)
    distributed.skip_deepspeed_inference_all_reduce_build()
    assert deepspeed_torch_comm.build_shm_op() is None
    # Training never calls the op: of the comm backend's methods, only inference_all_reduce reads what it set up.
    source = inspect.getsource(deepspeed_torch_comm.TorchBackend)
    readers = [
        name
        for name, member in inspect.getmembers(deepspeed_torch_comm.TorchBackend, inspect.isfunction)
        if name != "__init__"
        and ("shm_comm_op" in inspect.getsource(member) or "shm_vector" in inspect.getsource(member))
    ]
    assert readers == ["inference_all_reduce"] and "build_shm_op()" in source


def test_a_prepared_dataset_keeps_a_fingerprint():
    import datasets

    split = datasets.Dataset.from_dict({"input_ids": [[1, 2]]})
    assert isinstance(split._fingerprint, str) and split._fingerprint  # recorded in train.py's inputs.json


def test_models_keep_their_attention_kernel_name_on_the_config():
    from conftest import tiny_model

    assert tiny_model("llama").config._attn_implementation == "eager"  # read to register Ulysses attention


def test_lm_eval_ruler_downloads_punkt_through_nltk_download_at_import():
    # longrope/ruler.py replaces nltk.download while it imports lm-eval's NIAH module, whose import-time download of
    # punkt_tab can only fail offline. If lm-eval stops downloading there (or downloads another way), the guard must go.
    spec = importlib.util.find_spec("lm_eval.tasks.ruler.prepare_niah")
    assert spec is not None and spec.origin
    source = open(spec.origin).read()
    assert 'nltk.download("punkt_tab")' in source and "\ndownload_nltk_resources()" in source


def test_atexit_can_run_the_exit_functions_of_a_forked_child():
    # longrope/preloaded.py ends a forked stage with os._exit, which skips atexit; it runs them through this first,
    # as the interpreter would on exit (W&B, logging, temporary directories).
    import atexit

    ran = []
    atexit.register(ran.append, 1)
    try:
        atexit._run_exitfuncs()
    finally:
        atexit.unregister(ran.append)
    assert ran == [1]
