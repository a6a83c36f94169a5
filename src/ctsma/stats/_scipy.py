"""``scipy.stats``, imported on first use: it takes about a second to import, and commands that load the statistics
with other packages without computing any (``ctsma infer`` loads the diagnosis package) need none of it."""


def scipy_stats():
    from scipy import stats

    return stats
