"""`edit.py` with one DDP rank made to fail (for tests/test_ddp.py): the rank named by KEDIT_TEST_FAIL_RANK raises
EditFailed at its first edit. Lightning re-launches this script for the other ranks, so each decides for itself."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kedit_pl.distributed import launched_rank  # noqa: E402
from kedit_pl.errors import EditFailed  # noqa: E402
from kedit_pl.methods.base import EditMethod  # noqa: E402

if launched_rank() == int(os.environ["KEDIT_TEST_FAIL_RANK"]):
    def _fail(self, requests):
        raise EditFailed(f"injected failure on rank {launched_rank()}")

    EditMethod.apply = _fail

import hydra  # noqa: E402

import edit  # noqa: E402

# edit.py's main under this script's name (sys.argv[0]), so Lightning re-launches this script for the other ranks
hydra.main(config_path=str(ROOT / "conf"), config_name="edit", version_base="1.3")(edit.main.__wrapped__)()
