"""Clair: chat (Ollama) and images (SDXL) on one GPU. `python app.py --help` lists every option.

`python app.py adduser NAME`, `deluser NAME` and `users` manage the accounts (clair/edge/users.py).
"""

import sys

from clair.main import main

if __name__ == "__main__":
    sys.exit(main())
