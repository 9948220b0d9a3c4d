import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


# The quick tier (`pytest -m "not slow"`, a few minutes) leaves out what starts processes, compiles, or runs a whole
# job; these are marked here, the tests marked in their files besides. CI runs everything.
SLOW = {
    "test_shortened_quickstart_end_to_end", "test_two_processes_compiled_train_identically",
    "test_compiled_training_follows_eager_and_keeps_checkpoint_keys", "test_compiles_as_one_graph_with_the_same_output_and_gradients",
    "test_kill_during_save_leaves_previous_checkpoint", "test_fid_equals_pytorch_fid_and_npz_interchange",
    "test_fid_of_rgba_folders_equals_pytorch_fid", "test_fid_same_with_two_processes", "test_whole_job_end_to_end_and_resumable",
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


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.originalname in SLOW:
            item.add_marker(pytest.mark.slow)
