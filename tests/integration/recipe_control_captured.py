"""Control for test_recipes: the common mistake -- the password is read once, when the pool
is made -- so connections opened after the token expires are refused (28P01)."""

from sqlalchemy import Engine, create_engine, text

from jwtpgproxy.client import token_source_from_env

tokens = token_source_from_env()


def open_pool() -> Engine:
    password = tokens.token()  # captured once: the mistake
    return create_engine(
        "postgresql+psycopg://", pool_recycle=1, connect_args={"password": password}
    )


def query_once(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("select pg_backend_pid()")).scalar_one())


def close_pool(engine: Engine) -> None:
    engine.dispose()
