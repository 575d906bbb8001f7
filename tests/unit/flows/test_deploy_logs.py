"""flows.deploy's runner log filter: the poller's per-poll "N scheduled runs skipped (at capacity)" is said once."""
import logging


class _Keep(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_at_capacity_is_said_once_plainly():
    from flows.deploy import _AtCapacityOnce

    logger = logging.getLogger("test_deploy_logs.runner")
    logger.setLevel(logging.INFO)
    keep = _Keep()
    logger.addHandler(keep)
    logger.addFilter(_AtCapacityOnce())
    for n in (3, 4, 5):
        logger.info("%d scheduled runs skipped (at capacity)", n)
    logger.info("something else")
    assert keep.messages == ["a run is in progress (one at a time): later scheduled runs wait for it; none is "
                             "dropped (said once)", "something else"]
