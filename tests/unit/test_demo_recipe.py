"""The demo's recipes: world 1's settings stay those its published figures were made with, world 2 has its own
calibrated band fine-tune, and the organism's fine-tunes run on a fixed number of torch threads."""

from __future__ import annotations

import pytest
import torch

from sqsd_ray.demo import pipeline
from sqsd_ray.demo.pipeline import DemoSettings, Recipe, pinned_threads


def test_world_1_keeps_the_settings_of_its_published_figures():
    recipe = DemoSettings(world=1).recipe
    assert (recipe.corpus_size, recipe.lr, recipe.epochs, recipe.restore_max_iters) == (420, 1e-3, 5, 50)
    assert recipe.arm_names == list(pipeline.ARMS) and recipe.torch_threads == 2


def test_world_2_has_its_calibrated_band_fine_tune_and_the_rest_of_world_1s_recipe():
    graded, first = DemoSettings(world=2).recipe, DemoSettings(world=1).recipe
    assert (graded.lr, graded.epochs) == (pipeline.GRADED_LR, pipeline.GRADED_EPOCHS) != (first.lr, first.epochs)
    assert graded.restore_max_iters == 20
    unchanged = ("corpus_size", "arm_names", "direction_steps", "pilot_steps", "max_new_tokens", "eval_limit",
                 "alphas", "mitigate_corpora", "torch_threads")
    assert {k: getattr(graded, k) for k in unchanged} == {k: getattr(first, k) for k in unchanged}
    # --quick is CI-sized whatever the world
    assert DemoSettings(world=2, quick=True).recipe == DemoSettings(world=1, quick=True).recipe


def test_smollm2_leaves_torch_its_threads():
    assert Recipe.smollm2(quick=False).torch_threads is None


@pytest.mark.parametrize("threads", [1, 3])
def test_pinned_threads_sets_and_restores(threads):
    before = torch.get_num_threads()
    with pinned_threads(threads):
        assert torch.get_num_threads() == threads
    assert torch.get_num_threads() == before
    with pinned_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), pinned_threads(threads):
        raise RuntimeError("a failed stage")
    assert torch.get_num_threads() == before
