import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

torch.set_num_threads(1)

# .ci/wheel_check.sh runs tests against the installed wheel: then they must not
# import the checkout's pipec/ (the current directory on sys.path would do it)
if os.environ.get("PIPEC_TEST_INSTALLED") == "1":
    import pipec

    _checkout = Path(__file__).resolve().parents[1]
    if _checkout in Path(pipec.__file__).resolve().parents:
        raise RuntimeError(f"PIPEC_TEST_INSTALLED=1 but pipec comes from the checkout: {pipec.__file__}")
