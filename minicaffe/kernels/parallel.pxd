# Shared by the kernels' prange loops.

cdef inline int team_size(Py_ssize_t items, int num_threads) noexcept nogil:
    """Threads worth starting for ``items`` independent work items: never more threads than items."""
    if items < num_threads:
        return <int>items if items > 1 else 1
    return num_threads if num_threads > 1 else 1
