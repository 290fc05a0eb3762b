"""``python -m peft_fed.unmixing``: the same as ``peft-fed unmix``."""

from .cli import main

raise SystemExit(main())
