"""_compat.py: every private bitsandbytes/trl name adapterkit uses exists in the pinned versions,
and a missing one fails loudly, naming the package, the name and _compat.py."""
import pytest

from adapterkit import _compat


def test_every_private_name_exists_in_the_pinned_versions():
    _compat.check_all()
    assert _compat.has_cpu_repacking()  # bitsandbytes 0.50's CPU layout, undone by quant.keep_compute_dtype


def test_a_missing_private_name_fails_naming_it_and_compat():
    with pytest.raises(_compat.CompatError, match=r"trl \S+ has no trl\.models\.utils\.no_such_name .*"
                                                  r"written for trl 1\.16\.x.*adapterkit/_compat\.py"):
        _compat.private("trl.models.utils", "no_such_name")
    assert _compat.private("trl.models.utils", "no_such_name", optional=True) is None


def test_a_dpo_trainer_without_the_loss_entry_is_refused():
    with pytest.raises(_compat.CompatError, match="DPOTrainer has no _compute_loss"):
        _compat.dpo_loss_entry(object)


def test_a_trainer_whose_checkpoint_hooks_changed_is_refused():
    from transformers import Trainer

    class Moved(Trainer):
        def _save_rng_state(self, folder):  # a parameter renamed: our replacement would not fit
            pass

    _compat.trainer_checkpoint_hooks(Trainer)
    with pytest.raises(_compat.CompatError, match=r"Trainer\._save_rng_state is now \(folder\).*_compat\.py"):
        _compat.trainer_checkpoint_hooks(Moved)
