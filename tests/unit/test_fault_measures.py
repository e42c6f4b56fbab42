"""How fault runs measure what users notice: audio in audio time, stalls, the report (no network)."""

from __future__ import annotations

from townhall.v1.relay_pb2 import AudioFrame, Chunk
from townhall_tools.faults.measure import Outcome, Progress, Tape, audio_gap_ms, spread
from townhall_tools.faults.runner import Report


def chunk(*sequences: int, speaker: int = 7) -> Chunk:
    return Chunk(frames=[AudioFrame(speaker_id=speaker, sequence=s) for s in sequences])


def test_missing_audio_is_counted_in_frames_whatever_relay_or_epoch_delivered_the_rest() -> None:
    tape = Tape(speaker=7)
    tape.record(chunk(10, 11, 12), at=1.0)
    tape.record(chunk(13, speaker=8), at=1.1)  # another speaker: not this tape's
    tape.record(chunk(16, 17), at=2.5)  # 13..15 never arrived
    tape.record(chunk(16), at=2.6)  # sent again after a move: heard once
    assert (tape.first_heard(), tape.newest, tape.repeats) == (10, 17, 1)
    assert audio_gap_ms(tape.missing(10, 19)) == 5 * 20  # 13, 14, 15 and the unheard 18, 19
    assert tape.longest_silence(0.5, 3.0) == 1.5


def test_frames_arriving_late_out_of_order_are_counted() -> None:
    tape = Tape(speaker=7)
    tape.record(chunk(1, 3), at=1.0)
    tape.record(chunk(2), at=1.1)
    assert tape.out_of_order == 1 and tape.missing(1, 3) == 0


def test_the_longest_stall_of_a_growing_count() -> None:
    progress = Progress(lambda: 0)
    progress.samples = [(0.0, 1), (0.1, 2), (0.2, 2), (0.9, 2), (1.0, 5), (1.1, 6)]
    assert progress.longest_stall(0.0, 1.1) == 0.9


def test_the_report_gives_p50_and_max_over_runs_and_sums_anything_lost() -> None:
    report = Report()
    report.outcomes["edge-kill"] = [
        Outcome(
            "edge-kill", "kill -9 of the room's edge relay", {"recovery_s": r, "gap_ms_max": g, "errors": 0}
        )
        for r, g in [(0.2, 0), (0.4, 40), (0.3, 0)]
    ]
    report.outcomes["admission-kill"] = [Outcome("admission-kill", "x", {"recovery_s": 0.7, "lost": 1})]
    rows = {row["scenario"]: row for row in report.summary()}
    assert (rows["edge-kill"]["recovery_s_p50"], rows["edge-kill"]["recovery_s_max"]) == (0.3, 0.4)
    assert (rows["edge-kill"]["gap_ms_p50"], rows["edge-kill"]["gap_ms_max"]) == (0, 40)
    assert rows["admission-kill"]["lost"] == 1
    assert (
        "| kill -9 of the room's edge relay (`edge-kill`) | 3 | 3 | 0.30 / 0.40 | 0 / 40 | 0 | 0 |"
        in report.markdown()
    )
    assert spread([]) == (0.0, 0.0)
