"""Reading URL lists, downloading, filtering and sharding."""

import os

# albumentations (imported by img2dataset's resizer) checks PyPI for a newer version
# on import: a network call from every worker, and a warning. Off.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Ray reports usage statistics to its servers unless told not to; this machine must
# send nothing off-host.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
