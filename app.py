"""Clair: chat (Ollama) and images (SDXL) on one GPU. `python app.py --help` lists every option."""

import sys

from clair.main import main

if __name__ == "__main__":
    sys.exit(main())
