"""defuse.quiet: Lightning's chatter and the expected library warnings are hidden inside a stage, nothing else."""

import logging
import warnings

import pytest
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from defuse.quiet import quiet_libraries


@pytest.fixture
def lightning_lines():
    """What Lightning's rank-zero logger emits, collected by a handler of our own (Lightning's own handler may or
    may not be attached, depending on what configured logging first)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    handler = Collect(level=logging.DEBUG)
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def test_lightning_info_is_hidden_inside_and_shown_again_after(lightning_lines):
    logging.getLogger("pytorch_lightning").setLevel(logging.INFO)  # what Lightning sets when first imported
    with quiet_libraries():
        rank_zero_info("GPU available: False, used: False")
    rank_zero_info("after the stage")
    assert lightning_lines == ["after the stage"]


def test_verbose_shows_lightning_info(lightning_lines):
    logging.getLogger("pytorch_lightning").setLevel(logging.INFO)
    with quiet_libraries(enabled=False):
        rank_zero_info("Tip: install litlogger")
    assert lightning_lines == ["Tip: install litlogger"]


def test_expected_library_warnings_are_hidden_but_a_users_own_warning_is_not():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_libraries():
            warnings.warn("using precomputed metric; inverse_transform will be unavailable", UserWarning)
            warnings.warn("n_jobs value 1 overridden to 1 by setting random_state. Use no seed for parallelism.",
                          UserWarning)
            warnings.warn("You defined a `validation_step` but have no `val_dataloader`. Skipping val loop.",
                          UserWarning)  # correct's fine-tunes and the image judge: no validation loop on purpose
            warnings.warn("my model's own warning", UserWarning)
        warnings.warn("using precomputed metric; inverse_transform will be unavailable", UserWarning)
    assert [str(w.message) for w in caught] == [
        "my model's own warning", "using precomputed metric; inverse_transform will be unavailable"]
