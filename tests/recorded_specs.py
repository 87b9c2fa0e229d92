"""Reading plugin.record_calls() output in tests."""


def training_specs(calls, role="cross"):
    """The spec ``role`` ran at each training forward, consecutive repeats collapsed (one entry per value)."""
    specs = []
    for c in calls:
        if c.role == role and c.training and (not specs or specs[-1] != c.spec):
            specs.append(c.spec)
    return specs
