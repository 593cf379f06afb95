"""KV block bookkeeping (prefix cache, reference counts, copy-on-write), stop strings and the chat
template, as pure data structures: no model, no HTTP."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from capstan_workloads.serve.blocks import BlockManager, BlockTable, Copy, OutOfBlocks
from capstan_workloads.serve.chat import DEFAULT_TEMPLATE, ChatTemplate, ChatTemplateError
from capstan_workloads.serve.stops import StopText

BT = 4  # tokens per block in these tests: small, so prompts span several blocks


def test_allocate_all_or_nothing_and_reuse() -> None:
    mgr = BlockManager(4, BT)
    a = mgr.allocate(3)
    with pytest.raises(OutOfBlocks):
        mgr.allocate(2)
    assert mgr.num_free == 1  # a failed allocation takes nothing
    mgr.release(a)
    assert mgr.num_free == 4 and mgr.num_used == 0
    assert sorted(mgr.allocate(4)) == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="released more often"):
        mgr.release([0, 0])


def test_same_prompt_hits_the_cache_after_the_first_is_done() -> None:
    mgr = BlockManager(16, BT)
    prompt = list(range(10))  # two full blocks and a partial one
    (first,) = mgr.admit(prompt, 1, fed_tokens=12) or []
    assert first.cached_tokens == 0
    mgr.commit(first, prompt)
    shared = first.blocks[:2]
    # Still running: a second request with the same start shares its two full blocks.
    (second,) = mgr.admit([*prompt[:8], 99, 98], 1, fed_tokens=12) or []
    assert second.cached_tokens == 8 and second.blocks[:2] == shared
    assert [mgr.refcount[b] for b in shared] == [2, 2]
    mgr.free(first)
    mgr.free(second)
    assert mgr.num_used == 0 and mgr.num_cached == 2  # unreferenced, still findable
    (third,) = mgr.admit(prompt, 1, fed_tokens=12) or []
    assert third.cached_tokens == 8 and third.blocks[:2] == shared


def test_whole_prompt_cached_still_leaves_its_last_token_to_compute() -> None:
    mgr = BlockManager(16, BT)
    prompt = list(range(8))  # exactly two blocks
    (a,) = mgr.admit(prompt, 1, fed_tokens=8) or []
    mgr.commit(a, prompt)
    mgr.free(a)
    (b,) = mgr.admit(prompt, 1, fed_tokens=8) or []
    # The last token's logits give the first output token, so its block is computed again.
    assert b.cached_tokens == 4


def test_unreferenced_cached_blocks_are_evicted_lru_when_the_pool_is_short() -> None:
    mgr = BlockManager(6, BT)
    old, new = [1] * 8 + [0], [2] * 8 + [0]
    for prompt in (old, new):
        (t,) = mgr.admit(prompt, 1, fed_tokens=9) or []
        mgr.commit(t, prompt)
        mgr.free(t)
    assert mgr.num_cached == 4 and mgr.num_free == 6
    # Three blocks: the two free ones (the partial last blocks), then the least recently released
    # cached one: old's first block, which breaks old's whole chain.
    (big,) = mgr.admit([3] * 9, 1, fed_tokens=9) or []
    assert len(big.blocks) == 3 and mgr.num_cached == 3
    (again,) = mgr.admit(new, 1, fed_tokens=9) or []
    assert again.cached_tokens == 8  # the recent prompt survived
    mgr.free(big)
    mgr.free(again)
    (cold,) = mgr.admit(old, 1, fed_tokens=9) or []
    assert cold.cached_tokens == 0


def test_choices_share_the_prompt_and_copy_its_partial_block_on_write() -> None:
    mgr = BlockManager(16, BT)
    prompt = list(range(6))
    tables = mgr.admit(prompt, 3, fed_tokens=12) or []
    assert len(tables) == 3
    full, partial = tables[0].blocks[:2]
    assert all(t.blocks[:2] == [full, partial] for t in tables)
    assert mgr.refcount[full] == mgr.refcount[partial] == 3
    assert all(len(t.reserve) == 1 for t in tables)
    copies = [mgr.prepare_write(t, 6) for t in tables]
    # The first two copy the shared block; the last one owns it by then and writes in place.
    assert copies[2] is None and all(isinstance(c, Copy) and c.src == partial for c in copies[:2])
    assert len({t.blocks[1] for t in tables}) == 3 and mgr.refcount[full] == 3
    for t in tables:
        mgr.free(t)
    assert mgr.num_used == 0


def test_a_request_too_big_for_now_takes_nothing() -> None:
    mgr = BlockManager(4, BT)
    (a,) = mgr.admit([1] * 9, 1, fed_tokens=9) or []  # three blocks
    assert mgr.admit([2] * 5, 1, fed_tokens=5) is None
    assert mgr.num_free == 1
    mgr.free(a)
    assert mgr.admit([2] * 5, 1, fed_tokens=5) is not None


def test_no_prefix_caching_never_hits() -> None:
    mgr = BlockManager(8, BT, prefix_caching=False)
    prompt = list(range(9))
    (a,) = mgr.admit(prompt, 1, fed_tokens=9) or []
    mgr.commit(a, prompt)
    mgr.free(a)
    (b,) = mgr.admit(prompt, 1, fed_tokens=9) or []
    assert b.cached_tokens == 0 and mgr.num_cached == 0


@dataclass(eq=False)  # two choices may look alike; each is its own
class Live:
    table: BlockTable
    tokens: list[int]  # tokens whose K/V this choice has written, position by position
    fed: int  # positions it may ever write


class BlockMachine(RuleBasedStateMachine):
    """Random admissions, writes and frees against a shadow copy of every block's contents.

    The shadow records which token each slot holds, so a copy-on-write that is missing or wrong, a
    block freed while still in use, or a cache hit on different tokens shows up as a sequence whose
    blocks do not read back its own tokens.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mgr = BlockManager(num_blocks=20, block_tokens=BT)
        self.slots: dict[int, list[int | None]] = {b: [None] * BT for b in range(20)}
        self.live: list[Live] = []

    def _write(self, table: BlockTable, position: int, token: int) -> None:
        self.slots[table.blocks[position // BT]][position % BT] = token

    @rule(
        prompt=st.lists(st.integers(0, 2), min_size=1, max_size=14),
        n=st.integers(1, 3),
        extra=st.integers(0, 8),
    )
    def admit(self, prompt: list[int], n: int, extra: int) -> None:
        fed = len(prompt) + extra
        free_before = self.mgr.num_free
        tables = self.mgr.admit(prompt, n, fed)
        if tables is None:
            # Refused only when even a request with no cache hit would not fit.
            assert self.mgr.group_need(len(prompt), n, fed) > free_before
            assert self.mgr.num_free == free_before
            return
        assert len(tables) == n
        cached = tables[0].cached_tokens
        assert cached % BT == 0 and cached < len(prompt)
        for p in range(cached):  # a hit really holds this prompt's tokens
            assert self.slots[tables[0].blocks[p // BT]][p % BT] == prompt[p]
        for p in range(cached, len(prompt)):  # prefill: once, for every choice
            self._write(tables[0], p, prompt[p])
        for t in tables:
            self.mgr.commit(t, prompt)
            self.live.append(Live(t, list(prompt), fed))

    @precondition(lambda self: any(len(s.tokens) < s.fed for s in self.live))
    @rule(data=st.data(), token=st.integers(0, 2))
    def decode(self, data: st.DataObject, token: int) -> None:
        seq = data.draw(st.sampled_from([s for s in self.live if len(s.tokens) < s.fed]))
        position = len(seq.tokens)
        copy = self.mgr.prepare_write(seq.table, position)
        if copy is not None:
            self.slots[copy.dst] = list(self.slots[copy.src])
        self._write(seq.table, position, token)
        seq.tokens.append(token)
        self.mgr.commit(seq.table, seq.tokens)

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.mgr.free(seq.table)

    @invariant()
    def refcounts_match_the_tables(self) -> None:
        expected = [0] * self.mgr.num_blocks
        for seq in self.live:
            for b in seq.table.blocks + seq.table.reserve:
                expected[b] += 1
        assert self.mgr.refcount == expected  # never negative, never leaked
        assert self.mgr.num_free == expected.count(0)  # every unreferenced block can be reused

    @invariant()
    def every_choice_reads_back_its_own_tokens(self) -> None:
        for seq in self.live:
            got = [self.slots[seq.table.blocks[p // BT]][p % BT] for p in range(len(seq.tokens))]
            assert got == seq.tokens

    def teardown(self) -> None:
        for seq in self.live:
            self.mgr.free(seq.table)
        assert self.mgr.num_used == 0 and self.mgr.num_free == self.mgr.num_blocks


TestBlockMachine = BlockMachine.TestCase
TestBlockMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@pytest.mark.parametrize(
    ("pieces", "stops", "streamed", "text", "stopped"),
    [
        (["ab", "c", "de"], (), ["ab", "c", "de"], "abcde", False),
        (["ab", "c", "de"], ("cd",), ["a", "b", ""], "ab", True),  # "c" held back, then cut
        (["a", "bc", "d"], ("x", "bcd"), ["", "a", ""], "a", True),
        (["hello", " wor", "ld"], ("!", "zz"), ["hell", "o wo", "rl"], "hello world", False),
        (["ab", "cd"], ("cd", "bc"), ["a", ""], "a", True),  # the earliest match wins
    ],
)
def test_stop_text(
    pieces: list[str], stops: tuple[str, ...], streamed: list[str], text: str, stopped: bool
) -> None:
    st_ = StopText(stops)
    assert [st_.append(p) for p in pieces] == streamed
    tail = st_.flush()
    assert st_.text == text and st_.stopped == stopped
    assert "".join(streamed) + tail == text  # nothing streamed is ever taken back


def test_default_chat_template_and_generation_prompt() -> None:
    tpl = ChatTemplate(DEFAULT_TEMPLATE)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert tpl.render(msgs) == "system: be brief\nuser: hi\nassistant: "
    assert tpl.render(msgs, add_generation_prompt=False) == "system: be brief\nuser: hi\n"


def test_chat_template_is_sandboxed_and_may_refuse() -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")
    strict = ChatTemplate(
        "{% if messages[0].role != 'system' %}{{ raise_exception('the first message must be system') }}"
        "{% endif %}ok"
    )
    with pytest.raises(ChatTemplateError, match="first message must be system"):
        strict.render([{"role": "user", "content": "x"}])
    # The data is immutable and Python internals are out of reach.
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ messages.append(1) }}").render([])
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([])
