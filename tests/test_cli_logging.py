"""The CLI's logging: our INFO messages shown, other libraries' INFO hidden unless --verbose."""
import subprocess
import sys

SNIPPET = """
import logging, sys
from mlla.cli import configure_logging
configure_logging(verbose=sys.argv[1] == "1")
logging.getLogger("onnxscript").info("third-party chatter")
logging.getLogger("onnx_ir.passes").info("more chatter")
logging.getLogger("mlla.engine.trainer").info("our progress")
logging.getLogger("onnxscript").warning("a real problem")
"""


def _stderr(verbose: bool) -> str:
    return subprocess.run([sys.executable, "-c", SNIPPET, str(int(verbose))], capture_output=True, text=True, check=True).stderr


def test_third_party_info_is_quiet_unless_verbose():
    quiet = _stderr(False)
    assert "our progress" in quiet and "a real problem" in quiet
    assert "chatter" not in quiet
    loud = _stderr(True)
    assert "third-party chatter" in loud and "more chatter" in loud and "our progress" in loud
