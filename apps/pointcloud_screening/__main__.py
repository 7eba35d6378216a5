"""``python -m apps.pointcloud_screening``."""

from apps.pointcloud_screening.run import main

if __name__ == "__main__":
    main()
