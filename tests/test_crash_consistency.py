"""SIGKILL a publish and a pull at every file operation; after each, the store must be whole.

The writer runs in a forked child (the parent has already imported torch and huggingface_hub,
so a child costs milliseconds) with every file-changing call counted: ``os.rename``,
``os.replace``, ``os.mkdir``, ``os.rmdir``, ``os.unlink``/``os.remove``, ``os.symlink``,
``os.fsync``, ``os.open`` and ``open`` for writing. At call number k the child SIGKILLs itself,
before the call runs, for every k from 1 to the number of calls a clean run makes. Then the
parent opens the store afresh (crash recovery runs) and checks the invariants:

- publish: the pack holds its old versions, and either all of the new ones or none of them;
- pull: the pack is the old revision or the new one, whole (never missing, never mixed), with
  the ``pack.json`` commit that matches its contents. The pull downloads straight into a staged
  pack folder inside the store's transaction (``hf_hub_download(local_dir=...)``; the unchanged
  files are hard-linked from the installed pack), so the kill points include every write of the
  download itself, and a killed download must leave nothing behind: not in the store, not in the
  Hugging Face cache (which holds only the index);
- always: every version verifies, and no transaction, temp or staging file is left.
"""

from __future__ import annotations

import builtins
import io
import os
import shutil
import signal
import warnings
from pathlib import Path

import hub_server
import pytest
import torch

from p2pz_directions import hub
from p2pz_directions.core.concept import Concept, EncoderInfo
from p2pz_directions.core.store import LocalStore

pytestmark = pytest.mark.usefixtures("one_thread")
fake_hub = hub_server.fake_hub

ENC = EncoderInfo("local/clip-crash0123456789", 4, "clip", max_length=2)
REPO = "alice/crash"
_OS_CALLS = ("rename", "replace", "mkdir", "rmdir", "unlink", "remove", "symlink", "fsync")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


@pytest.fixture
def fast_tmp(tmp_path):
    """A folder on tmpfs when there is one: fsync costs nothing there, and the kill points and
    invariants do not depend on the disk (a shared runner's disk makes 100+ runs slow)."""
    import tempfile

    shm = "/dev/shm"
    if not (os.path.isdir(shm) and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    d = tempfile.mkdtemp(prefix="p2pz-crash-", dir=shm)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def concept(name: str, seed: int) -> Concept:
    g = torch.Generator().manual_seed(seed)
    return Concept(name, torch.randn(ENC.max_length, ENC.hidden_size, generator=g), ENC, captions=[name])


def _install_counter(kill_at: int, count: list[int]) -> None:
    """Count file-changing calls in this (child) process; SIGKILL before call ``kill_at``."""

    def tick() -> None:
        count[0] += 1
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(fn):
        def inner(*a, **k):
            tick()
            return fn(*a, **k)

        return inner

    for name in _OS_CALLS:
        setattr(os, name, wrap(getattr(os, name)))
    real_os_open, real_open = os.open, builtins.open

    def counted_os_open(path, flags, *a, **k):
        if flags & _WRITE_FLAGS:
            tick()
        return real_os_open(path, flags, *a, **k)

    def counted_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            tick()
        return real_open(file, mode, *a, **k)

    os.open = counted_os_open
    builtins.open = io.open = counted_open


def run_in_child(fn, kill_at: int) -> tuple[bool, int]:
    """Run ``fn`` in a forked child killed at file operation ``kill_at``; (was it killed, ops done)."""
    from huggingface_hub.utils import close_session, get_session

    close_session()  # a fresh client with no pooled connection, for the child to inherit
    get_session()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(r)
        code = 0
        count = [0]
        try:
            _install_counter(kill_at, count)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()
        except BaseException:  # noqa: BLE001 - reported through the exit code
            code = 3
        os.write(w, str(count[0]).encode())
        os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    ops = os.read(r, 64).decode()
    os.close(r)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True, kill_at
    assert os.WEXITSTATUS(status) == 0, f"the writer failed without a kill (exit {os.WEXITSTATUS(status)})"
    return False, int(ops)


def assert_clean(store: LocalStore) -> None:
    n, problems = store.verify()
    assert problems == [], problems
    for scratch in ("txn", "tmp", "staging"):
        d = store.root / scratch
        assert not d.exists() or not any(d.iterdir()), f"{scratch}/ left behind: {list(d.iterdir())}"
    left = [p for p in store.root.rglob(".*.tmp")]
    assert left == [], left


def test_publish_many_killed_at_every_file_operation(fast_tmp):
    tmp_path = fast_tmp
    template = tmp_path / "template"
    LocalStore(template).publish(concept("bird", 0), pack="mine")
    old_bird = LocalStore(template).entries()[0].content_hash
    root = tmp_path / "store"

    def publish():
        LocalStore(root).publish_many([concept("cat", 1), concept("dog", 2)], pack="mine")

    shutil.copytree(template, root)
    killed, total = run_in_child(publish, kill_at=10**9)
    assert not killed and total > 10
    seen = set()
    for k in range(1, total + 1):
        shutil.rmtree(root)
        shutil.copytree(template, root)
        assert run_in_child(publish, kill_at=k)[0]
        store = LocalStore(root)
        names = sorted(e.name for e in store.entries(pack="mine"))
        assert names in (["bird"], ["bird", "cat", "dog"]), f"kill at op {k}/{total}: {names}"
        assert store.entries(name="bird")[0].content_hash == old_bird
        assert_clean(store)
        seen.add(tuple(names))
        # the store works on after the crash: the publish completes
        store.publish_many([concept("cat", 1), concept("dog", 2)], pack="mine")
        assert sorted(e.name for e in store.entries(pack="mine")) == ["bird", "cat", "dog"]
    assert seen == {("bird",), ("bird", "cat", "dog")}  # kills before and after the commit point


def test_pull_killed_at_every_file_operation(fake_hub, fast_tmp):
    tmp_path = fast_tmp
    pub = LocalStore(tmp_path / "publisher")
    pub.publish_many([concept("cat", 1), concept("dog", 2)], pack="p")
    c1 = hub.push("p", REPO, token=fake_hub.token, store=pub).commit
    template = tmp_path / "template"
    hub.pull(REPO, store=LocalStore(template))  # the installed pack: revision c1
    pub.publish_many([concept("horse", 3)], pack="p")
    c2 = hub.push("p", REPO, token=fake_hub.token, store=pub).commit
    old = {"cat@1", "dog@1"}
    new = old | {"horse@1"}
    root = tmp_path / "store"

    def do_pull():
        hub.pull(REPO, store=LocalStore(root))

    shutil.copytree(template, root)
    killed, total = run_in_child(do_pull, kill_at=10**9)  # also puts c2's index in the HF cache
    assert not killed and total > 5
    shutil.rmtree(root)
    shutil.copytree(template, root)
    killed, total = run_in_child(do_pull, kill_at=10**9)  # the count with the index cached
    assert not killed
    print("KILLPOINTS", total)  # TEMP
    seen = set()
    for k in range(1, total + 1):
        shutil.rmtree(root)
        shutil.copytree(template, root)
        assert run_in_child(do_pull, kill_at=k)[0]
        store = LocalStore(root)
        have = {f"{e.name}@{e.version}" for e in store.entries(pack=REPO)}
        commit = store.pack_info(REPO).source["commit"]
        assert (have, commit) in ((old, c1), (new, c2)), f"kill at op {k}/{total}: {sorted(have)} at {commit}"
        assert_clean(store)
        seen.add(commit)
    assert seen == {c1, c2}
    from huggingface_hub import constants

    cached = [
        p
        for p in Path(constants.HF_HUB_CACHE).rglob("*")
        if p.name in ("embedding.safetensors", "concept.json")
    ]
    assert cached == []  # the concepts never went through the HF cache (the index and the push's card do)
