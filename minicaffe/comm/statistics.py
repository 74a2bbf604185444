"""Communication statistics of a session, per layer, as MLSL's Statistics.

For each layer with gradients to reduce: the bytes handed to MPI per iteration, the time its gradients
were in flight (from the issue of its bucket's collective until that was seen complete) and the time the
solver actually spent on them (exposed communication: packing and issuing the collective, and waiting
for it). The overlap fraction is 1 - exposed / in flight, at least 0: the share of communication that
backprop (or the next forward) hid.
"""
import dataclasses

from ..log import fmt


@dataclasses.dataclass
class LayerCommStats:
    name: str
    bytes_per_iter: int = 0
    float32_bytes_per_iter: int = 0
    iterations: int = 0
    in_flight_s: float = 0.0
    exposed_s: float = 0.0


class Statistics:
    """Per-layer totals since the last ``reset``; ``summary()`` and ``report()`` read them."""

    def __init__(self):
        self.layers = {}
        # Wall time with any collective in flight: layers fused in one bucket share one collective, and
        # buckets in flight at the same time count once.
        self.collectives_in_flight_s = 0.0

    def layer(self, name):
        stats = self.layers.get(name)
        if stats is None:
            stats = self.layers[name] = LayerCommStats(name)
        return stats

    def reset(self):
        for stats in self.layers.values():
            stats.iterations, stats.in_flight_s, stats.exposed_s = 0, 0.0, 0.0
        self.collectives_in_flight_s = 0.0

    def summary(self):
        in_flight = self.collectives_in_flight_s
        exposed = sum(s.exposed_s for s in self.layers.values())
        iterations = max((s.iterations for s in self.layers.values()), default=0)
        return {
            "iterations": iterations,
            "bytes_per_iter": sum(s.bytes_per_iter for s in self.layers.values()),
            "float32_bytes_per_iter": sum(s.float32_bytes_per_iter for s in self.layers.values()),
            "in_flight_s": in_flight,
            "exposed_s": exposed,
            "overlap": overlap_fraction(exposed, in_flight),
            "layers": [dataclasses.asdict(s) for s in self.layers.values()],
        }

    def report(self, log, per_layer=True):
        """Logs the table: per layer, then the total with the overlap fraction."""
        total = self.summary()
        n = max(total["iterations"], 1)
        log.info(f"Communication statistics over {total['iterations']} iterations (per iteration):")
        if per_layer:
            log.info(f"    {'layer':>16} {'bytes':>12} {'in flight ms':>13} {'exposed ms':>11} {'overlap':>8}")
            for s in self.layers.values():
                log.info(f"    {s.name:>16} {s.bytes_per_iter:>12d} {1e3 * s.in_flight_s / n:>13.4g} "
                         f"{1e3 * s.exposed_s / n:>11.4g} {overlap_fraction(s.exposed_s, s.in_flight_s):>8.3f}")
        saved = total["float32_bytes_per_iter"] - total["bytes_per_iter"]
        log.info(f"    total: {total['bytes_per_iter']} bytes/iter"
                 + (f" ({saved} fewer than float32)" if saved else "")
                 + f", in flight {fmt(1e3 * total['in_flight_s'] / n)} ms, exposed "
                 f"{fmt(1e3 * total['exposed_s'] / n)} ms, overlap fraction {total['overlap']:.3f}")


def overlap_fraction(exposed, in_flight):
    return max(0.0, 1.0 - exposed / in_flight) if in_flight > 0 else 0.0
