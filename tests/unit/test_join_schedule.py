"""The join load generator's schedule: what a run sends and measures is the schedule's, not the clock's."""

from townhall_tools.bench.join_generator import Schedule


def test_a_late_or_descheduled_generator_sends_each_arrival_once_counted_where_it_was_due() -> None:
    arrivals = Schedule(rate=200, warmup_s=0.5, seconds=2.0)
    on_time = arrivals.due(0.3)  # in the warmup
    late = arrivals.due(1.7)  # the generator was descheduled across the warmup's end
    last = arrivals.due(9.0)  # and its last turn came long past the end
    sent = [*on_time, *late, *last]
    assert sent == list(range(500)) and not arrivals.due(9.5), "each arrival once, none past the end"
    measured = [arrivals.measured_at(a) for a in sent]
    assert measured[:100] == [None] * 100, "the warmup's, however late they were sent"
    assert measured[100] == 0.5 and measured[-1] == 2.495, "the rest, at the time each was due"
    assert sum(at is not None for at in (arrivals.measured_at(a) for a in late)) == 241
    assert sum(at is not None for at in measured) == 400, "rate x seconds, however late the turns"


def test_no_rate_no_arrivals() -> None:
    assert not Schedule(rate=0.0, warmup_s=0.5, seconds=2.0).due(5.0)
