"""Entry point for Streamlit Community Cloud: the app of ../streamlit_app.py, unchanged.

Community Cloud installs the requirements file beside the entry point before the one at the
repository root, so deploying this file takes cloud/requirements.txt: the same packages with
PyTorch's CPU-only build, which keeps the server well under Cloud's 1 GB (bench/README.md).
Locally (from the repository root): ``streamlit run cloud/streamlit_app.py``.
"""
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `import core` whatever the working directory
runpy.run_path(str(ROOT / "streamlit_app.py"), run_name="__main__")
