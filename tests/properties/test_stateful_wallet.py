"""Stateful property: random flows, batches, retries and replays driven through the service layer
(`Wallet` and `post()`) agree, step by step, with a plain model of balances and idempotency keys,
on SQLite and on PostgreSQL; the ledger verifies clean throughout. A key keeps what it got, a
transaction or a refusal by the ledger's state (API-operations.md: a refusal is final)."""

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from wallet.domain.errors import (
    IdempotencyKeyReused,
    InsufficientFunds,
    InvalidRequest,
    Refusal,
    UnknownAsset,
    UnknownTransaction,
    UnknownUser,
    UserExists,
    WalletError,
)
from wallet.domain.ledger import (
    MAX_AMOUNT,
    Command,
    Direction,
    Flow,
    Posted,
    Transaction,
    UserId,
)
from wallet.service.audit import verify
from wallet.service.posting import Outcome, post
from wallet.service.seed import ALICE, BOB, seed
from wallet.service.wallet import PageRequest, Wallet
from wallet.settings import Settings
from wallet.store.database import Database, create_engine
from wallet.store.migrate import migrate
from wallet.store.tables import balances, metadata

T = TypeVar("T")
BACKENDS = ["sqlite", "postgresql"]
ASSETS = ("DIAMONDS", "GOLD_COINS", "LOYALTY_POINTS")
UNKNOWN_ASSET = "SILVER"
# Seeded users, and ids a rule may create later: a flow for one of them fails with UnknownUser
# until it exists, and the same key may then succeed. A system account is never a user.
USER_POOL = (ALICE, BOB, "carol", "dave")
NOT_A_USER = "system:treasury"
VERIFY_EVERY = 10  # steps between full ledger audits (and once more at the end)

MACHINE_SETTINGS = settings(
    max_examples=30,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    # No explain phase: on a failure it would replay the example hundreds of times more, for
    # little more than the shrunk steps already say.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)

amounts = st.one_of(
    st.integers(1, 60),  # small: many spends succeed
    st.integers(1, 1_500),  # around the seed balances: some spends overdraw
    st.sampled_from([0, MAX_AMOUNT, MAX_AMOUNT + 1]),  # the edges of the valid range
)
# Mostly ids and symbols that exist (or may), now and then ones that never will.
user_ids = st.sampled_from(USER_POOL * 3 + (NOT_A_USER,))
asset_symbols = st.sampled_from((*ASSETS, *ASSETS, UNKNOWN_ASSET))


@st.composite
def flow_requests(draw: st.DrawFn) -> Command:
    """A flow request without its key (the rule gives it one)."""
    flow = draw(st.sampled_from(Flow))
    return Command(
        flow=flow,
        user_id=UserId(draw(user_ids)),
        asset_symbol=draw(asset_symbols),
        amount=draw(amounts),
        idempotency_key="",
        note=None if flow is Flow.TOPUP else draw(st.sampled_from([None, "gift", "refund"])),
        metadata=(
            draw(st.sampled_from([None, {"order": "1"}, {"order": "2"}]))
            if flow is Flow.TOPUP
            else None
        ),
    )


def with_key(command: Command, key: str) -> Command:
    return dataclasses.replace(command, idempotency_key=key)


def as_request(transaction: Transaction) -> Command:
    """The request that made a stored transaction."""
    return Command(
        flow=transaction.flow,
        user_id=transaction.user_id,
        asset_symbol=transaction.asset_symbol,
        amount=transaction.amount,
        idempotency_key=transaction.idempotency_key,
        note=transaction.note,
        metadata=transaction.metadata,
    )


class Model:
    """What the wallet should hold: users, every account's balances, and what each key did."""

    def __init__(self) -> None:
        self.users: set[str] = set()
        self.balances: Counter[tuple[str, str]] = Counter()
        self.sent: dict[str, Command] = {}  # the last request sent with each key
        self.applied: dict[str, Transaction] = {}  # the transaction of each key that applied
        # The request and the refusal of each key the ledger's state refused: stored, as final
        # as a transaction, so the same request replays it and another is a reuse.
        self.refused: dict[str, tuple[Command, Refusal]] = {}
        self.history: dict[str, list[Transaction]] = {}  # each user's, oldest first

    def record(self, command: Command, transaction: Transaction) -> None:
        self.balances[(command.debited, command.asset_symbol)] -= command.amount
        self.balances[(command.credited, command.asset_symbol)] += command.amount
        self.applied[command.idempotency_key] = transaction
        self.history[command.user_id].append(transaction)

    def refusals(self, command: Command) -> set[type[WalletError]]:
        """The errors any one of which may answer the request before anything is applied. The
        contract leaves their order open: a request can be both for an unknown user and a reuse."""
        found: set[type[WalletError]] = set()
        if command.user_id not in self.users:
            found.add(UnknownUser)
        if command.asset_symbol not in ASSETS:
            found.add(UnknownAsset)
        if not 1 <= command.amount <= MAX_AMOUNT:
            found.add(InvalidRequest)
        earlier = self.applied.get(command.idempotency_key)
        if earlier is not None and as_request(earlier) != command:
            found.add(IdempotencyKeyReused)
        refused = self.refused.get(command.idempotency_key)
        if refused is not None and refused[0] != command:
            found.add(IdempotencyKeyReused)
        return found

    def user_balances(self, user_id: str) -> dict[str, int]:
        return {asset: self.balances[(user_id, asset)] for asset in ASSETS}


class WalletMachine(RuleBasedStateMachine):
    """Drives one seeded database; each hypothesis example starts from a freshly emptied one."""

    keys = Bundle("keys")

    def __init__(self, database: Database, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.database = database
        self.loop = loop
        self.wallet = Wallet(database)
        self.model = Model()
        self.fresh_keys = 0
        self.steps = 0
        self.steps_checked = -1  # reaches `steps` only when every check of the last step passed
        self.run(_reset(database))

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(work)

    def fresh_key(self) -> str:
        self.fresh_keys += 1
        return f"key-{self.fresh_keys}"

    def execute(self, command: Command) -> Outcome:
        try:
            return self.run(self.wallet.execute(command))
        except WalletError as error:
            return error

    def check(self, command: Command, outcome: Outcome) -> None:
        """Check one outcome against the model, and apply it to the model."""
        model = self.model
        model.sent[command.idempotency_key] = command
        refusals = model.refusals(command)
        if refusals:
            assert type(outcome) in refusals, f"{command} gave {outcome!r}, not one of {refusals}"
            return
        earlier = model.applied.get(command.idempotency_key)
        if earlier is not None:
            assert isinstance(outcome, Posted), f"a retry of {command} gave {outcome!r}"
            assert outcome.is_replay
            assert outcome.transaction == earlier, "a replay returned another transaction"
            return
        refused = model.refused.get(command.idempotency_key)
        if refused is not None:
            # The refusal again, whatever the balance is now: same error, same detail.
            _, refusal = refused
            assert type(outcome) is type(refusal), f"a retry of {command} gave {outcome!r}"
            assert isinstance(outcome, Refusal)
            assert outcome.is_replay, f"a retry of refused {command} was refused anew"
            assert outcome.detail == refusal.detail, "a replay returned another refusal"
            return
        user_balance = model.balances[(command.user_id, command.asset_symbol)]
        if command.flow is Flow.SPEND and command.amount > user_balance:
            assert isinstance(outcome, InsufficientFunds), f"{command} gave {outcome!r}"
            assert not outcome.is_replay
            model.refused[command.idempotency_key] = (command, outcome)
            return
        assert isinstance(outcome, Posted), f"{command} gave {outcome!r}"
        assert not outcome.is_replay
        transaction = outcome.transaction
        assert as_request(transaction) == command
        model.record(command, transaction)
        assert transaction.balance_after == model.balances[(command.user_id, command.asset_symbol)]

    def keyed(self, command: Command, key: str | None) -> tuple[Command, bool]:
        """The command with the given key, or a fresh one; and whether the key is new."""
        if key is None:
            return with_key(command, self.fresh_key()), True
        return with_key(command, key), False

    def step(self) -> None:
        self.steps += 1

    @initialize(target=keys)
    def seed_is_known(self) -> Any:
        """The seed's users and opening top-ups, read back; their keys may be replayed."""
        self.step()
        for user_id in (ALICE, BOB):
            self.model.users.add(user_id)
            seeded, _ = self.run(
                self.wallet.history(
                    user_id=user_id, flow=None, asset_symbol=None, page=PageRequest(limit=500)
                )
            )
            self.model.history[user_id] = []
            for transaction in reversed(seeded):
                command = as_request(transaction)
                self.model.sent[command.idempotency_key] = command
                self.model.record(command, transaction)
        return multiple(*self.model.applied)

    @rule(user_id=st.sampled_from(USER_POOL))
    def create_user(self, user_id: str) -> None:
        """A user of the pool: created once, UserExists ever after."""
        self.step()
        try:
            user = self.run(
                self.wallet.create_user(
                    user_id=user_id, email=f"{user_id}@example.com", name=user_id.title()
                )
            )
        except UserExists:
            assert user_id in self.model.users, f"creating new user {user_id} gave UserExists"
            return
        assert user_id not in self.model.users, f"user {user_id} was created twice"
        assert user.id == user_id
        self.model.users.add(user_id)
        self.model.history[user_id] = []

    @rule(target=keys, request=flow_requests(), key=st.none() | keys)
    def execute_flow(self, request: Command, key: str | None) -> Any:
        """One flow with a fresh key, or with a key already used for whatever request."""
        self.step()
        command, is_new = self.keyed(request, key)
        self.check(command, self.execute(command))
        return command.idempotency_key if is_new else multiple()

    @rule(key=keys)
    def retry(self, key: str) -> None:
        """The last request sent with a key, again: a replay if it applied or the ledger's state
        refused it, else a new try."""
        self.step()
        command = self.model.sent[key]
        self.check(command, self.execute(command))

    @rule(
        key=keys,
        change=st.sampled_from(["flow", "user", "asset", "amount", "note", "metadata"]),
    )
    def reuse_key_for_a_nearly_same_request(self, key: str, change: str) -> None:
        """The last request of a key with one field changed: a reuse if the key applied or was
        refused by the ledger's state."""
        self.step()
        sent = self.model.sent[key]
        changed: dict[str, Any] = {
            "flow": {"flow": Flow.BONUS if sent.flow is Flow.TOPUP else Flow.TOPUP},
            "user": {"user_id": BOB if sent.user_id == ALICE else ALICE},
            "asset": {
                "asset_symbol": "DIAMONDS" if sent.asset_symbol != "DIAMONDS" else "GOLD_COINS"
            },
            "amount": {"amount": sent.amount + 1 if sent.amount < MAX_AMOUNT else 1},
            "note": {"note": "changed" if sent.note is None else None},
            "metadata": {"metadata": {"order": "changed"} if sent.metadata is None else None},
        }[change]
        command = dataclasses.replace(sent, **changed)
        self.check(command, self.execute(command))

    @rule(target=keys, data=st.data())
    def spend_about_the_whole_balance(self, data: st.DataObject) -> Any:
        """A spend of a balance minus one, exactly, or plus one: the edge of overdrawing."""
        self.step()
        user_id = data.draw(st.sampled_from(sorted(self.model.users)), label="user_id")
        asset = data.draw(st.sampled_from(ASSETS), label="asset")
        margin = data.draw(st.sampled_from([-1, 0, 1]), label="margin")
        amount = max(1, min(MAX_AMOUNT, self.model.balances[(user_id, asset)] + margin))
        command = Command(
            flow=Flow.SPEND,
            user_id=UserId(user_id),
            asset_symbol=asset,
            amount=amount,
            idempotency_key=self.fresh_key(),
        )
        self.check(command, self.execute(command))
        return command.idempotency_key

    @precondition(lambda self: bool(self.model.refused))
    @rule(data=st.data())
    def retry_a_refusal_once_the_funds_are_there(self, data: st.DataObject) -> None:
        """A request the ledger refused, sent again after a top-up that covers it: the refusal
        is final (API-operations.md), so this is it replayed, not a new try."""
        self.step()
        key = data.draw(st.sampled_from(sorted(self.model.refused)), label="refused key")
        command, _ = self.model.refused[key]
        shortfall = command.amount - self.model.balances[(command.user_id, command.asset_symbol)]
        if shortfall > 0:
            topup = Command(
                flow=Flow.TOPUP,
                user_id=command.user_id,
                asset_symbol=command.asset_symbol,
                amount=shortfall,
                idempotency_key=self.fresh_key(),
            )
            self.check(topup, self.execute(topup))
        assert command.amount <= self.model.balances[(command.user_id, command.asset_symbol)]
        self.check(command, self.execute(command))

    @rule(target=keys, data=st.data(), size=st.integers(1, 6))
    def post_a_batch(self, data: st.DataObject, size: int) -> Any:
        """Several commands in one transaction: fresh and used keys, and keys repeated within the
        batch, as the same request or another; outcomes follow the model in arrival order."""
        self.step()
        commands: list[Command] = []
        new_keys: list[str] = []
        for _ in range(size):
            shape = data.draw(
                st.sampled_from(["new", "repeat", "rekey"] if commands else ["new"]), label="shape"
            )
            if shape == "repeat":
                commands.append(data.draw(st.sampled_from(commands), label="repeat"))
                continue
            request = data.draw(flow_requests(), label="request")
            if shape == "rekey":
                earlier = data.draw(st.sampled_from(commands), label="rekey")
                commands.append(with_key(request, earlier.idempotency_key))
                continue
            command, is_new = self.keyed(request, data.draw(st.none() | self.keys, label="key"))
            commands.append(command)
            if is_new:
                new_keys.append(command.idempotency_key)

        outcomes = self.run(post(self.database, commands))

        assert len(outcomes) == len(commands)
        for command, outcome in zip(commands, outcomes, strict=True):
            self.check(command, outcome)
        return multiple(*new_keys)

    @rule(key=keys)
    def read_transaction(self, key: str) -> None:
        """A key's transaction reads back whole, with one debit and one credit entry."""
        self.step()
        sent = self.model.sent[key]
        applied = self.model.applied.get(key)
        if applied is None:
            if sent.user_id in self.model.users:  # a failed request left no transaction
                history = self.model.history[sent.user_id]
                assert all(t.idempotency_key != key for t in history)
            return
        transaction, entries = self.run(
            self.wallet.transaction(user_id=applied.user_id, transaction_id=applied.id)
        )
        assert transaction == applied
        command = as_request(applied)
        assert {(e.account_id, e.direction, e.amount) for e in entries} == {
            (command.debited, Direction.DEBIT, command.amount),
            (command.credited, Direction.CREDIT, command.amount),
        }
        assert all(e.transaction_id == applied.id for e in entries)
        for user_id in self.model.users - {applied.user_id}:  # others cannot read it
            try:
                self.run(self.wallet.transaction(user_id=user_id, transaction_id=applied.id))
            except UnknownTransaction:
                continue
            raise AssertionError(f"user {user_id} read another user's transaction")

    @rule(user_id=st.sampled_from(USER_POOL))
    def read_history_and_ledger(self, user_id: str) -> None:
        """A user's transactions and ledger entries list exactly what applied, newest first."""
        self.step()
        page = PageRequest(limit=500)
        if user_id not in self.model.users:
            for read in (
                self.wallet.history(user_id=user_id, flow=None, asset_symbol=None, page=page),
                self.wallet.ledger(user_id=user_id, asset_symbol=None, page=page),
            ):
                try:
                    self.run(read)
                except UnknownUser:
                    continue
                raise AssertionError(f"read of a user {user_id} who does not exist")
            return
        expected = list(reversed(self.model.history[user_id]))
        history, cursor = self.run(
            self.wallet.history(user_id=user_id, flow=None, asset_symbol=None, page=page)
        )
        assert cursor is None
        assert history == expected
        entries, cursor = self.run(
            self.wallet.ledger(user_id=user_id, asset_symbol=None, page=page)
        )
        assert cursor is None
        assert [(e.transaction_id, e.amount, e.balance_after) for e in entries] == [
            (t.id, t.amount, t.balance_after) for t in expected
        ]
        assert [e.direction for e in entries] == [
            Direction.DEBIT if t.flow is Flow.SPEND else Direction.CREDIT for t in expected
        ]

    @invariant()
    def balances_match_the_model(self) -> None:
        for user_id in sorted(self.model.users):
            held = dict(self.run(self.wallet.balances(user_id=user_id)))
            assert held == self.model.user_balances(user_id), f"balances of {user_id}"
        if self.steps % VERIFY_EVERY == 0:
            self.assert_ledger_is_sound()
        self.steps_checked = self.steps

    def assert_ledger_is_sound(self) -> None:
        """`verify` finds nothing, and every stored balance, system accounts included, is the
        model's (so per asset they sum to zero)."""
        failures = [f"{c.name}: {f}" for c in self.run(verify(self.database)) for f in c.failures]
        assert not failures, failures
        stored = self.run(_stored_balances(self.database))
        assert stored == {k: v for k, v in self.model.balances.items() if v}
        for asset in ASSETS:
            assert sum(v for (_, a), v in stored.items() if a == asset) == 0

    def teardown(self) -> None:
        # After a failed step the model is behind the database; the failure is already reported.
        if self.steps_checked == self.steps:
            self.assert_ledger_is_sound()


async def _reset(database: Database) -> None:
    """Empty every table and seed again, so an example starts where the seed leaves off."""
    async with database.transaction(is_write=True) as connection:
        if database.dialect == "postgresql":
            tables = ", ".join(table.name for table in metadata.sorted_tables)
            await connection.execute(sa.text(f"TRUNCATE {tables} RESTART IDENTITY"))
        else:
            for table in reversed(metadata.sorted_tables):
                await connection.execute(table.delete())
    await seed(database)


async def _stored_balances(database: Database) -> dict[tuple[str, str], int]:
    """Every nonzero balance row, read past the service."""
    async with database.transaction(is_write=False) as connection:
        rows = await connection.execute(sa.select(balances))
        return {(r.account_id, r.asset_symbol): r.balance for r in rows if r.balance}


def _run_machine(url: str, *, is_new: bool) -> None:
    """Run the machine on its own event loop, which also creates and disposes the engine."""
    loop = asyncio.new_event_loop()
    try:
        database = Database(create_engine(Settings(database_url=url)))
        try:
            if is_new:
                loop.run_until_complete(migrate(database))
            run_state_machine_as_test(
                lambda: WalletMachine(database, loop), settings=MACHINE_SETTINGS
            )
        finally:
            loop.run_until_complete(database.close())
    finally:
        loop.close()


# Passing takes seconds; a failure is worth its minimal example, and hypothesis may shrink for up
# to five minutes before printing it.
@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_flows_batches_and_retries_agree_with_a_model(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # A plain (sync) test: pytest-asyncio leaves it alone, so the machine owns its loop.
    if backend == "sqlite":
        _run_machine(f"sqlite+aiosqlite:///{tmp_path / 'wallet.db'}", is_new=True)
    else:
        _run_machine(request.getfixturevalue("postgres_url"), is_new=False)
