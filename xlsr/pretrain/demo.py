"""``python -m xlsr.pretrain.demo``: the old name of ``python -m xlsr.demo`` (the demo moved to :mod:`xlsr.demo`)."""

from xlsr.demo.__main__ import main

if __name__ == "__main__":
    raise SystemExit(main())
