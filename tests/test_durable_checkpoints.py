"""Durable checkpoints (issue 24, part 3): every file and folder of a checkpoint reaches the disk before `latest`
names it; a re-save of a step interrupted at any point leaves `latest` naming a complete checkpoint; ranks on
several nodes refuse an output folder that they do not share.

The first two run checkpoint.save in this process on a real DeepSpeed engine of the tiny model (a world of one);
the last starts two simulated nodes."""

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from grpo_ds import checkpoint, distributed
from helpers import ROOT, TINY_FLAGS, free_port, start_nodes

STATE = {"step": 0, "note": "test"}


@pytest.fixture(scope="module")
def engine(tiny_model):
    """The tiny model's ZeRO-2 policy engine, in a world of one in this process (the launcher's variables are set
    for the module only, unless a launcher set them)."""
    from grpo_ds.config import Config, validate
    from grpo_ds.models import load_model, load_tokenizer

    with pytest.MonkeyPatch.context() as env:
        for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                               MASTER_PORT=str(free_port())).items():
            if key not in os.environ:
                env.setenv(key, value)
        distributed.init_distributed()
        cfg = Config(model=str(tiny_model), ds_config=str(ROOT / "ds_configs" / "zero2.json"), rollouts_per_step=1,
                     group_size=2, train_batch_size=2)  # one micro-batch per optimizer step
        ds, _ = distributed.build_ds_config(distributed.load_ds_json(cfg.ds_config), cfg, validate(cfg, 1), False)
        policy = distributed.init_policy(lambda: load_model(str(tiny_model), torch.float32), ds)
        yield policy, load_tokenizer(str(tiny_model))


def train_once(policy) -> float:
    """One optimizer step on a made-up loss (new weights to save, optimizer state included); the new fingerprint."""
    ids = torch.arange(1, 12).unsqueeze(0)
    policy.backward(policy(input_ids=ids).logits.float().pow(2).mean())
    policy.step()
    return float(distributed.weights_fingerprint(policy))


def tree(path: Path) -> list[Path]:
    """Every file and folder under `path` (itself included), relative to it."""
    return [Path(".")] + sorted(p.relative_to(path) for p in path.rglob("*"))


def test_every_file_and_folder_is_flushed_before_latest_names_it(engine, tmp_path, monkeypatch):
    policy, tokenizer = engine
    out = tmp_path / "run"
    events = []  # ("fsync", path) and ("replace", src, dst), in order
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("replace", Path(src).resolve(), Path(dst).resolve()))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    checkpoint.save(policy, tokenizer, str(out), 1, STATE, 0)
    monkeypatch.undo()

    root = (out / "checkpoints").resolve()
    latest_moves = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == root / "latest"]
    assert latest_moves, "`latest` was never replaced"
    moved = latest_moves[-1]
    flushed = [e[1] for e in events[:moved] if e[0] == "fsync"]
    # a flushed path in the staging folder counts for the same path in the published one
    published = {root / re.sub(r"^\.staging-[^/]+/", "", str(p.relative_to(root))) if p.is_relative_to(root) else p
                 for p in flushed}
    final = root / "step_0000001"
    missing = [str(rel) for rel in tree(final) if final / rel not in published]
    assert not missing, f"not flushed before `latest` moved: {missing}"
    names = {p.name for p in tree(final)}  # DeepSpeed's files, the RNG state, hf/, trainer_state.json
    assert {"mp_rank_00_model_states.pt", "rng_state_rank0.pt", "hf", "config.json", "trainer_state.json"} <= names
    assert any(name.endswith("optim_states.pt") for name in names)
    # the checkpoint's entry in checkpoints/ is flushed after its rename into place and before `latest` moves
    into_place = max(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == final)
    assert any(e == ("fsync", root) for e in events[into_place:moved])
    # `latest` itself: its new content flushed before the rename, the rename flushed after it
    assert any(e[0] == "fsync" and e[1] == root / ".latest.tmp" for e in events[:moved])
    assert ("fsync", root) in events[moved:]
    assert (root / "latest").read_text() == "step_0000001\n"


class Crash(BaseException):
    """The process dies here (not an Exception: nothing may catch it)."""


def test_a_resave_interrupted_anywhere_leaves_latest_complete(engine, tmp_path, monkeypatch):
    """Save steps 1 and 2, then save step 2 again after another optimizer step (a run resumed from step 1 does
    so), crashing at its 1st, 2nd, ... folder rename or deletion (a deletion crashes after removing one file: a
    half-deleted folder), each time from the same start, until an attempt completes. After every crash, `latest`
    names a checkpoint with every file that DeepSpeed loads into the old or the new weights, never a mixture; and
    the save of a restarted run, from whatever the crash left, completes and clears the leftovers."""
    policy, tokenizer = engine
    out = tmp_path / "run"
    root = out / "checkpoints"
    checkpoint.save(policy, tokenizer, str(out), 1, STATE, 0)
    files = sorted(p.relative_to(root / "step_0000001") for p in (root / "step_0000001").rglob("*"))
    train_once(policy)
    checkpoint.save(policy, tokenizer, str(out), 2, STATE, 0)
    old = float(distributed.weights_fingerprint(policy))
    new = train_once(policy)
    policy.save_checkpoint(str(tmp_path / "new"), tag="new")  # to start every attempt from the same weights
    shutil.copytree(root, tmp_path / "start")  # and the same folder
    real_replace, real_rename, real_rmtree = os.replace, os.rename, shutil.rmtree
    crashes = []
    for crash_at in range(1, 50):
        real_rmtree(root)
        shutil.copytree(tmp_path / "start", root)
        policy.load_checkpoint(str(tmp_path / "new"), tag="new")
        calls = [0]

        def maybe_crash(what):
            calls[0] += 1
            if calls[0] == crash_at:
                crashes.append(what)
                raise Crash(what)

        def replace(src, dst, *args, **kwargs):
            maybe_crash(f"os.replace {Path(src).name} -> {Path(dst).name}")
            return real_replace(src, dst, *args, **kwargs)

        def rename(src, dst, *args, **kwargs):
            maybe_crash(f"os.rename {Path(src).name} -> {Path(dst).name}")
            return real_rename(src, dst, *args, **kwargs)

        def rmtree(path, *args, **kwargs):
            if calls[0] + 1 == crash_at and Path(path).is_dir():
                for victim in sorted(p for p in Path(path).rglob("*") if p.is_file())[:1]:
                    victim.unlink()  # the deletion was under way
            maybe_crash(f"shutil.rmtree {Path(path).name}")
            return real_rmtree(path, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(shutil, "rmtree", rmtree)
        try:
            checkpoint.save(policy, tokenizer, str(out), 2, STATE, 0)
            completed = True
        except Crash:
            completed = False
        finally:
            monkeypatch.undo()
        where = "after the save" if completed else f"after a crash at {crashes[-1]!r}"
        named = root / (root / "latest").read_text().strip()
        held = sorted(p.relative_to(named) for p in named.rglob("*")) if named.is_dir() else []
        assert held == files, f"{where}, `latest` names {named.relative_to(root)}, which lacks " \
                              f"{sorted(map(str, set(files) - set(held)))[:5]}"
        load_path, _ = policy.load_checkpoint(str(named.parent), tag=named.name)
        assert load_path is not None, f"{where}, DeepSpeed cannot load {named}"
        loaded = float(distributed.weights_fingerprint(policy))
        assert loaded in (old, new), f"{where}, {named} holds neither the old nor the new weights"
        if completed:
            assert loaded == new
            break
        # a run restarted from `latest` saves step 2 again over what the crash left
        checkpoint.save(policy, tokenizer, str(out), 2, STATE, 0)
        assert (root / "latest").read_text() == "step_0000002\n", where
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001", "step_0000002"], where
    print(f"re-save crashed at {len(crashes)} points, then completed: {crashes}")
    assert completed and len(crashes) >= 5, crashes
    assert (root / "latest").read_text() == "step_0000002\n"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001", "step_0000002"]


def test_a_failed_publication_is_a_checkpoint_error_on_every_rank(engine, tmp_path, monkeypatch):
    """Replacing `latest` fails (EIO): the save raises CheckpointError, which the trainer logs and trains on past,
    as it does for a failed write, instead of an OSError on rank 0 alone while the other ranks wait for it."""
    import errno

    policy, tokenizer = engine
    out = tmp_path / "run"
    checkpoint.save(policy, tokenizer, str(out), 1, STATE, 0)
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == "latest":
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.save(policy, tokenizer, str(out), 2, STATE, 0)
    monkeypatch.undo()
    assert str(info.value).startswith("checkpoint at step 2 failed (OSError: [Errno 5] Input/output error")
    assert (out / "checkpoints" / "latest").read_text() == "step_0000001\n"


@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False])
def test_nodes_refuse_an_output_folder_they_do_not_share(tmp_path, tiny_model, shared):
    """Two simulated nodes, each started in its own folder (or both in one) with the relative --output_dir run:
    apart, each would write its part of every checkpoint into its own run/ without an error."""
    cwds = [tmp_path / "node0", tmp_path / ("node0" if shared else "node1")]
    for cwd in cwds:
        cwd.mkdir(exist_ok=True)
    nodes = start_nodes(["--model", str(tiny_model), "--output_dir", "run", "--max_steps", "1", "--save_steps", "1",
                         "--ds_config", str(ROOT / "ds_configs" / "zero2.json"), *TINY_FLAGS], cwds)
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    if shared:
        assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
        saved = checkpoint.latest_checkpoint(str(cwds[0] / "run"))
        assert {p.name for p in saved.glob("rng_state_rank*.pt")} == {"rng_state_rank0.pt", "rng_state_rank1.pt"}
        assert not list((cwds[0] / "run").glob(".shared-check-*"))
        return
    assert [node.returncode for node in nodes] == [2, 2], outputs[0][-3000:] + outputs[1][-3000:]
    for output in outputs:
        refusals = [line for line in output.splitlines() if line.startswith("error: ")]
        assert len(refusals) == 1, output[-3000:]
        assert re.fullmatch(r"error: --output_dir run: rank\(s\) 1 \(.+\) cannot see the file rank 0 \(.+\) wrote "
                            r"there; every rank writes its part of each checkpoint into this folder, so it must be "
                            r"on a filesystem that every node mounts", refusals[0]), refusals[0]
        assert "Loading weights" not in output  # refused before any model loads
    assert not (cwds[1] / "run" / "checkpoints").exists()
