"""maintained per-account balances, kept by the database with every posting

Revision ID: 0009_balances
Revises: 0008_admin_audit
Create Date: 2026-12-03

Balances are read on every request (runway, ``/balance``, the extension) and by
every meter tick; summing a growing postings table each time does not scale.
``ledger_balances`` holds one row per ledger account whose balance the
database itself moves in the same transaction as each posting insert: a
statement-level trigger with a transition table on PostgreSQL (one upsert per
account per INSERT statement, so a bulk insert of 30,000 postings touches the
platform's row a few dozen times, not 30,000), a row trigger on SQLite. No
code path that inserts postings can forget it. Existing postings are summed in.
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_balances"
down_revision = "0008_admin_audit"
branch_labels = None
depends_on = None

PG_FUNCTION = """
CREATE FUNCTION gpuportal_ledger_balances_add() RETURNS trigger AS $$ BEGIN
  INSERT INTO ledger_balances (ledger_account_id, balance)
    SELECT ledger_account_id, SUM(amount) FROM new_postings
    GROUP BY ledger_account_id ORDER BY ledger_account_id
  ON CONFLICT (ledger_account_id)
    DO UPDATE SET balance = ledger_balances.balance + EXCLUDED.balance;
  RETURN NULL;
END; $$ LANGUAGE plpgsql
"""

SQLITE_TRIGGER = """
CREATE TRIGGER ledger_postings_balance AFTER INSERT ON ledger_postings BEGIN
  INSERT INTO ledger_balances (ledger_account_id, balance)
    VALUES (NEW.ledger_account_id, NEW.amount)
  ON CONFLICT (ledger_account_id) DO UPDATE SET balance = balance + excluded.balance;
END
"""


def upgrade() -> None:
    op.create_table(
        "ledger_balances",
        sa.Column("ledger_account_id", sa.Integer(), nullable=False),
        sa.Column("balance", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["ledger_account_id"],
            ["ledger_accounts.id"],
            name=op.f("fk_ledger_balances_ledger_account_id_ledger_accounts"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("ledger_account_id", name=op.f("pk_ledger_balances")),
    )
    op.execute(
        "INSERT INTO ledger_balances (ledger_account_id, balance) "
        "SELECT ledger_account_id, SUM(amount) FROM ledger_postings GROUP BY ledger_account_id"
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FUNCTION)
        op.execute(
            "CREATE TRIGGER ledger_postings_balance AFTER INSERT ON ledger_postings "
            "REFERENCING NEW TABLE AS new_postings FOR EACH STATEMENT "
            "EXECUTE FUNCTION gpuportal_ledger_balances_add()"
        )
    else:
        op.execute(SQLITE_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS ledger_postings_balance ON ledger_postings")
        op.execute("DROP FUNCTION IF EXISTS gpuportal_ledger_balances_add()")
    else:
        op.execute("DROP TRIGGER IF EXISTS ledger_postings_balance")
    op.drop_table("ledger_balances")
