"""``python -m xlsr.doctor``: see :mod:`xlsr.doctor.cli`."""

from xlsr.doctor.cli import main

if __name__ == "__main__":
    main()
