"""A DeepSpeed run's resume falls back from a tag that cannot be read to the newest older kept
one, with a note; a refusal (a changed recipe) is not a damaged tag and still stops the run.
The engine is a stand-in: what is tested is which tag the strategy asks it for."""

from __future__ import annotations

import json

import pytest

from memtrain.errors import MemtrainError
from memtrain.train.strategy import DS_CLIENT, DeepSpeedStrategy


class Engine:
    def __init__(self, damaged: set[str]) -> None:
        self.damaged = damaged
        self.asked: list[str] = []

    def load_checkpoint(self, path, tag):
        self.asked.append(tag)
        if tag in self.damaged:
            raise RuntimeError(f"cannot unpickle {tag}/mp_rank_00_model_states.pt")
        return path, {"step": int(tag[4:])}


def _strategy(tmp_path, tags, latest, damaged=()):
    for tag in tags:
        (tmp_path / tag).mkdir()
        (tmp_path / tag / DS_CLIENT).write_text(json.dumps({"step": int(tag[4:])}))
    (tmp_path / "latest").write_text(latest)
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    strategy.path, strategy.engine = tmp_path, Engine(set(damaged))
    return strategy


def test_a_damaged_latest_tag_falls_back_to_the_previous_one(tmp_path):
    strategy = _strategy(tmp_path, ["step4", "step6", "step8"], "step8", damaged={"step8"})
    notes = []
    state = strategy.load(lambda stored, folder: None, notes.append)
    assert state == {"step": 6} and strategy.engine.asked == ["step8", "step6"]
    assert len(notes) == 1 and "step8" in notes[0] and "previous kept checkpoint" in notes[0]


def test_tags_after_latest_are_never_used(tmp_path):
    strategy = _strategy(tmp_path, ["step2", "step4", "step9"], "step4", damaged={"step4"})
    assert strategy.load(lambda s, f: None, lambda _: None) == {"step": 2}
    assert strategy.engine.asked == ["step4", "step2"]


def test_no_readable_tag_is_one_line(tmp_path):
    strategy = _strategy(tmp_path, ["step2"], "step2", damaged={"step2"})
    with pytest.raises(MemtrainError) as raised:
        strategy.load(lambda s, f: None, lambda _: None)
    assert "\n" not in str(raised.value) and "could not load the checkpoint" in str(raised.value)


def test_a_refused_resume_does_not_fall_back(tmp_path):
    strategy = _strategy(tmp_path, ["step2", "step4"], "step4")

    def refuse(stored, folder):
        raise MemtrainError("cannot resume: data.seq changed")

    with pytest.raises(MemtrainError, match="data.seq changed"):
        strategy.load(refuse, lambda _: None)
    assert strategy.engine.asked == []
