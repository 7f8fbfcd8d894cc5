"""Locustfile for the worker pool's validation and bench: real workers log the requests of
pool_traffic.Traffic (no network), so a real worker's `stats` reports carry what a simulated
worker's carry. Settings from the environment: POOL_ENDPOINTS, POOL_SPREAD, POOL_FAIL_RATIO,
POOL_SEED, POOL_RPS_PER_USER (the worker pool's options of the same names)."""
import os
import random

from locust import User, constant_throughput, task

from pool_traffic import ERROR_MESSAGE, USER_CLASS, Traffic

TRAFFIC = Traffic(
    int(os.environ.get("POOL_ENDPOINTS", "1")),
    int(os.environ.get("POOL_SPREAD", "20")),
    float(os.environ.get("POOL_FAIL_RATIO", "0.01")),
    int(os.environ.get("POOL_SEED", "1")),
)


class PoolUser(User):
    wait_time = constant_throughput(float(os.environ.get("POOL_RPS_PER_USER", "1")))

    def on_start(self):
        self.rng = random.Random()

    @task
    def request(self):
        method, name, ms, failed = TRAFFIC.sample(self.rng)
        self.environment.events.request.fire(
            request_type=method, name=name, response_time=ms, response_length=1200,
            exception=Exception(ERROR_MESSAGE) if failed else None, context={},
        )


assert PoolUser.__name__ == USER_CLASS
