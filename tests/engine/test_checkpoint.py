"""engine.checkpoint on one process: exact round trips through weights_only loading, refusal of pickled code,
durable (fsynced) writes in the right order, and keeping the last k checkpoints."""
import json
import os
import random

import numpy as np
import pytest
import torch

from r1_engine.engine.checkpoint import _set_rng_state, latest_checkpoint, load_checkpoint, save_checkpoint, step_dir


class _Optimizer:
    """The slice of Megatron's optimizer interface the checkpoint code uses, over torch's Adam."""

    def __init__(self, params):
        self.inner = torch.optim.Adam(params, lr=0.1)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)

    def reload_model_params(self):
        pass


def _model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = _Optimizer(model.parameters())
    model(torch.randn(5, 4)).square().sum().backward()
    opt.inner.step()  # Adam state: step counts, moments
    return model, opt


def _save(out, step, model, opt, keep=None):
    return save_checkpoint(out, step, model=model, optimizer=opt, trainer_state={"step": step}, keep=keep)


def _draws():
    return random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist()


def test_round_trip_restores_weights_optimizer_and_every_rng_exactly(tmp_path):
    model, opt = _model_and_optimizer()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn()  # both keep a cached Gaussian: part of the state to restore
    path = _save(tmp_path, 7, model, opt)
    expected = _draws()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in opt.inner.state.values()]

    model2, opt2 = _model_and_optimizer(seed=1)  # different weights and moments, RNGs moved on
    _draws()
    assert load_checkpoint(path, model=model2, optimizer=opt2) == {"step": 7}
    assert _draws() == expected
    for k, v in model2.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for got, want in zip((s["exp_avg"] for s in opt2.inner.state.values()), moments):
        assert torch.equal(got, want)
    # the file holds tensors and plain data only
    blob = torch.load(path / "rank00000.pt", weights_only=True)
    assert isinstance(blob["rng"]["numpy"]["keys"], torch.Tensor) and isinstance(blob["rng"]["python"], dict)


def test_legacy_rng_tuples_still_restore():
    random.seed(5), np.random.seed(6)
    legacy = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    expected = _draws()
    _set_rng_state(legacy)
    assert _draws() == expected


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_runs_code_is_refused_not_executed(tmp_path):
    model, opt = _model_and_optimizer()
    path = _save(tmp_path, 1, model, opt)
    marker = tmp_path / "executed"
    torch.save({"model": _Payload(marker), "optimizer": {}, "rng": {}}, path / "rank00000.pt")
    with pytest.raises(ValueError, match=r"rank00000.pt: refused: .*posix.system"):
        load_checkpoint(path, model=model, optimizer=opt)
    assert not marker.exists()
    torch.load(path / "rank00000.pt", weights_only=False)  # the payload is real: unrestricted unpickling runs it
    assert marker.exists()


def test_a_truncated_file_is_named(tmp_path):
    model, opt = _model_and_optimizer()
    path = _save(tmp_path, 1, model, opt)
    data = (path / "rank00000.pt").read_bytes()
    (path / "rank00000.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="rank00000.pt: cannot be read, truncated or corrupt"):
        load_checkpoint(path, model=model, optimizer=opt)


def test_files_and_directories_are_fsynced_before_each_rename(tmp_path, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    model, opt = _model_and_optimizer()
    final = _save(tmp_path, 3, model, opt)
    ckpts, tmp = str(final.parent), str(final) + ".tmp"
    rename = events.index(("replace", tmp, str(final)))
    latest = events.index(("replace", f"{ckpts}/latest.tmp", f"{ckpts}/latest"))
    synced = [e[1] for e in events if e[0] == "fsync"]
    before_rename = {e[1] for e in events[:rename] if e[0] == "fsync"}
    assert {f"{tmp}/rank00000.pt", f"{tmp}/trainer.json", tmp} <= before_rename
    assert ("fsync", ckpts) in events[rename:latest]  # the rename is on disk before `latest` names it
    assert ("fsync", f"{ckpts}/latest.tmp") in events[rename:latest]
    assert ("fsync", ckpts) in events[latest:]
    assert len(synced) == 6


def test_keep_the_last_k_and_clear_crashed_saves(tmp_path):
    model, opt = _model_and_optimizer()
    for step in (1, 2):
        _save(tmp_path, step, model, opt)
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step_000003.tmp").mkdir()  # a crashed save
    _save(tmp_path, 3, model, opt, keep=2)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000002", "step_000003"]
    (ckpts / "step_000009").mkdir()  # past the current step (a lost `latest` update): left alone
    _save(tmp_path, 4, model, opt, keep=1)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000004", "step_000009"]
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 4)
    _save(tmp_path, 5, model, opt)  # keep=None: nothing deleted
    assert (ckpts / "step_000004").is_dir() and latest_checkpoint(tmp_path) == step_dir(tmp_path, 5)


def test_saving_the_same_step_again_replaces_it(tmp_path):
    model, opt = _model_and_optimizer()
    _save(tmp_path, 2, model, opt)
    save_checkpoint(tmp_path, 2, model=model, optimizer=opt, trainer_state={"step": 2, "again": True}, keep=2)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000002"]
    assert json.loads((ckpts / "step_000002" / "trainer.json").read_text())["again"] is True
    # a crash between moving the old copy aside and renaming the new one in: `latest` still finds a checkpoint
    os.replace(ckpts / "step_000002", ckpts / "step_000002.old")
    assert latest_checkpoint(tmp_path) == ckpts / "step_000002.old"
