"""The CLI's logging: our INFO messages shown, other libraries' INFO hidden unless --verbose."""
import logging

import pytest

from mlla.cli import configure_logging


@pytest.fixture
def restore_levels():
    loggers = [logging.getLogger(), logging.getLogger("mlla")]
    levels = [lg.level for lg in loggers]
    yield
    for lg, level in zip(loggers, levels):
        lg.setLevel(level)


def test_third_party_info_is_quiet_unless_verbose(restore_levels):
    configure_logging(verbose=False)
    assert logging.getLogger("mlla.engine.trainer").isEnabledFor(logging.INFO)
    for name in ("onnxscript", "onnx_ir.passes", "torch.onnx"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
        assert logging.getLogger(name).isEnabledFor(logging.WARNING), name
    configure_logging(verbose=True)
    assert logging.getLogger("onnxscript").isEnabledFor(logging.INFO)
    assert logging.getLogger("mlla.engine.trainer").isEnabledFor(logging.DEBUG)
