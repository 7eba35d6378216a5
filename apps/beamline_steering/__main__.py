"""``python -m apps.beamline_steering``."""

from apps.beamline_steering.run import main

if __name__ == "__main__":
    main()
