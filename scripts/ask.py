#!/usr/bin/env python
"""Quick inference: answer a question (or a file of them) with a model or a training run, and with --compare BASE
show the base model's answers beside the trained ones, as the tiny-grpo tutorial's run.py does.

    python scripts/ask.py runs/quickstart "Tom has 3 apples and buys 4 more. How many apples does he have?"
    python scripts/ask.py runs/quickstart --compare embedded --file questions.jsonl   # question/answer fields

Greedy by default, with the training chat template and system prompt; `--help` lists the flags.
"""

import sys

from grpo_ds.inference import ask_main

if __name__ == "__main__":
    sys.exit(ask_main())
