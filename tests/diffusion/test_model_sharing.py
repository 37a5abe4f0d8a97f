"""A module shared by clones with different patch sets, used from several threads: a caller inside
`ModelManager.use` keeps its weights however other threads load, use or unload the same module."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from diffusion.memory import ModelManager
from diffusion.patches.patcher import ModelPatcher
from diffusion.sharing import ModuleGates, SharingDeadlock
from tests.diffusion.test_memory import SIZE, WIDTH, lora_for, patchers

WAIT_S = 0.5  # how long a test gives another thread to do what it should not be able to do


def base_and_lora(strength: float = 0.7) -> tuple[ModelPatcher, ModelPatcher]:
    (base,) = patchers("base")
    lora = base.clone()
    lora.add_patches(lora_for(base.model, 1), strength)
    return base, lora


def test_load_from_another_thread_waits_until_the_user_is_done():
    """The reported bug: inside `use([lora])`, another caller's `load([base])` re-patched the module."""
    base, lora = base_and_lora()
    original = {k: v.clone() for k, v in base.model.state_dict().items()}
    manager = ModelManager("cpu", "cpu")
    x = torch.randn(2, WIDTH)
    entered, loaded = threading.Event(), threading.Event()

    def other_prompt() -> None:
        entered.wait()
        manager.load([base])
        loaded.set()

    thread = threading.Thread(target=other_prompt)
    thread.start()
    with manager.use([lora]) as (module,):
        before = module(x)
        entered.set()
        loaded.wait(WAIT_S)  # today's bug: the other load lands here
        loaded_inside = loaded.is_set()
        after = module(x)
    thread.join(10)
    torch.testing.assert_close(after, before)
    assert not loaded_inside
    assert loaded.is_set() and manager.is_loaded(base)
    assert all(torch.equal(v, original[k]) for k, v in base.model.state_dict().items())


def run_in_thread(fn) -> tuple[threading.Thread, threading.Event, list[BaseException]]:
    """Start fn in a thread; returns it, an event set when fn returned, and the exceptions it raised."""
    done, errors = threading.Event(), []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=target)
    thread.start()
    return thread, done, errors


def hold_once(gates: ModuleGates, patchers_: list[ModelPatcher]) -> None:
    with gates.hold(patchers_):
        pass


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_the_same_patch_set_is_shared_and_another_waits_first_come_first_served():
    base, lora = base_and_lora()
    gates = ModuleGates()
    release_first, order = threading.Event(), []

    def hold(patcher: ModelPatcher, label: str, until: threading.Event | None = None) -> None:
        with gates.hold([patcher]):
            order.append(label)
            if until is not None:
                until.wait(10)

    first, _, _ = run_in_thread(lambda: hold(base, "base 1", release_first))
    wait_until(lambda: order == ["base 1"])
    second, second_done, _ = run_in_thread(lambda: hold(base.clone(), "base 2"))  # same patch set: joins
    assert second_done.wait(10) and order == ["base 1", "base 2"]
    with_lora, _, _ = run_in_thread(lambda: hold(lora, "lora"))
    wait_until(lambda: gates.waiting() == 1)
    third, _, _ = run_in_thread(lambda: hold(base, "base 3"))  # would fit with base 1, but queues behind lora
    wait_until(lambda: gates.waiting() == 2)
    assert order == ["base 1", "base 2"]
    release_first.set()
    for thread in (first, second, with_lora, third):
        thread.join(10)
    assert order == ["base 1", "base 2", "lora", "base 3"]
    assert gates.holders(base.model) == 0 and gates.waiting() == 0


def test_exclusive_waits_for_every_holder_and_keeps_everyone_out():
    base, _ = base_and_lora()
    gates = ModuleGates()
    inside, release = threading.Event(), threading.Event()

    def exclusive() -> None:
        with gates.hold([base], exclusive=True), gates.hold([base]):  # its owner may use it again
            inside.set()
            release.wait(10)

    with gates.hold([base.clone()]):
        owner, _, errors = run_in_thread(exclusive)
        wait_until(lambda: gates.waiting() == 1)
        assert not inside.is_set()
    assert inside.wait(10)
    joiner, joined, _ = run_in_thread(lambda: hold_once(gates, [base]))
    wait_until(lambda: gates.waiting() == 1)
    assert not joined.is_set()
    release.set()
    owner.join(10)
    joiner.join(10)
    assert joined.is_set() and not errors


def test_nested_holds_again_with_the_same_patch_set_and_refuses_what_would_deadlock():
    a, b = patchers("a", "b")
    la, lb = a.clone(), b.clone()
    la.add_patches(lora_for(a.model, 1), 1.0)
    lb.add_patches(lora_for(b.model, 2), 1.0)
    gates = ModuleGates()
    with gates.hold([la]), gates.hold([la.clone()]):
        assert gates.holders(la.model) == 1
        with pytest.raises(SharingDeadlock, match="a"):  # another patch set of what this thread holds
            hold_once(gates, [a])
    # thread 1 holds a and wants b; thread 2 holds b and wants a, each with another patch set
    holding, asked = threading.Barrier(2), threading.Event()

    def one() -> None:
        with gates.hold([a]):
            holding.wait(10)
            with gates.hold([lb]):
                pass

    def two() -> None:
        with gates.hold([b]):
            holding.wait(10)
            wait_until(lambda: gates.waiting() == 1)
            asked.set()
            with gates.hold([la]):
                pass

    first, first_done, first_errors = run_in_thread(one)
    second, second_done, second_errors = run_in_thread(two)
    first.join(10)
    second.join(10)
    assert asked.is_set() and first_done.is_set() and second_done.is_set()
    assert not first_errors and [type(e) for e in second_errors] == [SharingDeadlock]


def test_several_modules_are_taken_together():
    a, b = patchers("a", "b")
    la = a.clone()
    la.add_patches(lora_for(a.model, 1), 1.0)
    gates = ModuleGates()
    with gates.hold([la]):
        both, both_done, _ = run_in_thread(lambda: hold_once(gates, [a, b]))
        wait_until(lambda: gates.waiting() == 1)
        assert gates.holders(b.model) == 0  # not half taken while a is busy
    both.join(10)
    assert both_done.is_set()


def test_unload_all_keeps_a_model_in_use_and_unload_waits_for_it():
    base, lora = base_and_lora()
    original = {k: v.clone() for k, v in base.model.state_dict().items()}
    manager = ModelManager("cpu", "cpu", budget_bytes=10 * SIZE)
    with manager.use([lora]) as (module,):
        patched = module[0].weight.clone()
        manager.unload_all()  # another worker's /free
        assert manager.is_loaded(lora) and torch.equal(module[0].weight, patched)
        thread, unloaded, _ = run_in_thread(lambda: manager.unload(base))
        wait_until(lambda: manager.gates.waiting() == 1)
        assert torch.equal(module[0].weight, patched)
    thread.join(10)
    assert unloaded.is_set() and manager.loaded() == []
    assert all(torch.equal(v, original[k]) for k, v in base.model.state_dict().items())
