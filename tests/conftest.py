import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Under pytest-xdist (the README's `-n 2`) the cores are shared out between the workers: two workers each spinning two
# OpenMP threads on two cores slow each other 10-20x. Processes the tests start inherit the same share.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
torch.set_num_threads(_THREADS)
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


# The quick tier (`pytest -m "not slow"`, a few minutes) leaves out what starts processes, compiles, or runs a whole
# job; these are marked here, the tests marked in their files besides. CI runs everything.
SLOW = {
    "test_shortened_quickstart_end_to_end", "test_two_processes_compiled_train_identically",
    "test_compiled_training_follows_eager_and_keeps_checkpoint_keys", "test_compiles_as_one_graph_with_the_same_output_and_gradients",
    "test_kill_during_save_leaves_previous_checkpoint", "test_fid_equals_pytorch_fid_and_npz_interchange",
    "test_rgba_folders_read_as_pytorch_fid_reads_them", "test_fid_same_with_two_processes", "test_whole_job_end_to_end_and_resumable",
    "test_w0_is_unconditional_w1_is_conditional_and_w_gt_1_moves_toward_the_class",
    "test_two_processes_precompute_disjoint_shards_holding_every_good_sample_once",
    "test_sampling_and_evaluation_decode_through_the_bundled_vae", "test_elbo_on_ddpm_schedules_is_above_the_likelihood",
    "test_nll_of_a_trained_model_is_finite_reproducible_and_has_the_documented_keys", "test_nll_same_with_two_processes",
    "test_every_sampler_from_the_command_line", "test_two_processes_make_the_same_images", "test_gaussian_data_recovered",
    "test_mixture_modes_and_weights_recovered", "test_zero_terminal_snr_every_sampler_at_default_steps",
    "test_the_adaptive_solvers_named_are_torchdiffeqs_and_adapt", "test_elbo_bounds_the_likelihood_and_tends_to_it_as_steps_grow",
    "test_short_run_lowers_loss_exports_and_logs", "test_mlp_learns_mixture_modes", "test_zero_terminal_snr_v_prediction",
    "test_zero_terminal_snr_schedules_give_the_closed_form_density_and_a_bound", "test_exact_resume_on_latent_shards",
}


# Under `pytest -n 2` (pytest-xdist, `--dist loadgroup` in pyproject.toml) each module runs on one worker, so its
# module-scoped fixtures are built once; test_launch.py (nearly half of the suite's time) is split in LAUNCH_GROUPS.
# Groups are handed out in HEAVY's order (the longest first, as measured under -n 2 on 2 cores), so that no long
# module starts last.
HEAVY = ["test_launch", "test_evaluate", "test_train", "test_samplers", "test_quickstart", "test_likelihood",
         "test_stable_diffusion", "test_gpu_check", "test_sample", "test_latent", "test_guidance"]
LAUNCH_GROUPS = 3


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    launch = 0
    for item in items:
        if item.originalname in SLOW:
            item.add_marker(pytest.mark.slow)
        module = item.path.stem
        if module == "test_launch":
            module, launch = f"{module}.{launch % LAUNCH_GROUPS}", launch + 1
        item.add_marker(pytest.mark.xdist_group(module))
    rank = {name: i for i, name in enumerate(HEAVY)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(HEAVY)))  # stable: file order within a module
