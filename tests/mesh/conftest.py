"""The mesh tests run on 8 simulated CPU devices: XLA reads the flag when jax first uses its backend, so
this folder runs in a process of its own (`tests/test_sharding.py` starts it)."""

import os

os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"])
